"""`reranker bench-quant`: every quantization level of a model measured on one evaluation set.

`sets.py` (evaluation sets) -> `quant.py` (make and measure levels; `worker.py` runs one level
in a fresh process; `recalibrate.py` fits `--recalibrate`'s corrections) -> `report.py` (markdown, JSON, plot).
"""
