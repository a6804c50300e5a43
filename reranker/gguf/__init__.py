"""Model files: the GGUF backbone and the head beside it.

- `header.py`: checks a path is a GGUF and reads header entries without parsing the vocabulary;
- `hub.py`: a local path, a folder, or `repo[:QUANT]` on the Hugging Face Hub -> the files;
- `convert.py`: an original checkpoint -> the release's GGUF and `mlp_weights.npz`;
- `quantize.py`: llama.cpp's quantizer, and the quantization level names.

(Inside this package, `import gguf` is still gguf-py: imports are absolute.)
"""
