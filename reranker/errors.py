"""The one exception type callers need to catch."""


class RerankerError(ValueError):
    """Bad input or an unusable model file; the message names the input and the fix."""
