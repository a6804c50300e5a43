"""Image inputs for jina-reranker-m0: input -> RGB image (`load`) -> the original's size (`preprocess`) ->
embeddings from the vision projector in llama.cpp's libmtmd (`encode`, which loads libmtmd on import)."""
