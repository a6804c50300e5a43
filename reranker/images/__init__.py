"""Image inputs for jina-reranker-m0: input -> RGB image (`load`; a PDF page rendered by `pdf`) -> the original's
size (`preprocess`) -> embeddings from the vision projector in llama.cpp's libmtmd (`encode`, which loads libmtmd on import)."""
