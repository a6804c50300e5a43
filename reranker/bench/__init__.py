"""`reranker bench-quant`: every quantization level of a model measured on one evaluation set.

`sets.py` (evaluation sets) -> `quant.py` (make and measure levels; `worker.py` runs one level
in a fresh process; `compare.py` computes fidelity to the reference and retrieval metrics; `recalibrate.py`
fits `--recalibrate`'s corrections) -> `report.py` (markdown, JSON, plot).
"""
