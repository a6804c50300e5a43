"""The engine: a (query, document) pair -> prompt ids -> the backbone's last hidden state -> a score.

Read in this order:
- `tokenizer.py`: text -> token ids with the GGUF's own vocabulary (user text stays text);
- `prompts.py`: a pair -> its prompt ids, ending with the scoring token, truncated as the original;
- `chunking.py`: long documents -> one prompt per chunk, chunk scores -> one score (opt-in);
- `batching.py`: prompts -> groups that fit one `llama_decode` call;
- `backbone.py`: packed token sequences -> last-token hidden states through llama.cpp;
- `identity.py`: the fast path's cached GGUF copy whose output projection is the identity, BF16 where the CPU gains;
- `cpu.py`: what the CPU and the llama.cpp build offer (native bf16), and the thread default;
- `scoring.py`: a window of prompts -> scores (length-sorted for packing, then the torch head).
"""
