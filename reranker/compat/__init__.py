"""llama-embedding compatibility: the upstream recipe's two steps, byte for byte.

- `embed.py`: formatted prompts -> last hidden states in llama-embedding's output formats;
- `head.py`: llama-embedding's JSON (or a .npy) -> scores with the torch head, streamed.
"""
