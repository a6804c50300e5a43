"""The one exception type callers catch, for every error they can cause.

Bad files (a missing or corrupt GGUF, an unusable head), bad records, bad arguments: all
raise `RerankerError` (or a subclass, such as `head.HeadLoadError`) with a message that names
the input and the fix. The CLI prints that message as one line and exits with status 2.
This module imports nothing, so the `head` package can build on it without llama.cpp.
"""


class RerankerError(ValueError):
    """Bad input or an unusable model file; the message names the input and the fix."""
