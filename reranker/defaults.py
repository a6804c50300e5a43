"""Every default and model constant, defined once; the rest of the package imports them from here.

Importing this module loads neither llama.cpp nor torch.
"""

from __future__ import annotations

# --- the model -------------------------------------------------------------------------------
#: The token whose last hidden state the head scores. The GGUF release renamed it `<|box_end|>`
#: and gave the old text of id 100 (a byte token) to id 151649; embedding rows were not moved.
SCORE_TOKEN_ID = 100
SCORE_TOKEN_TEXT = "<|box_end|>"
ORIGINAL_BOX_END_ID = 151649
#: Subtracted from the head's raw logit (JinaVLForRanking.LOGIT_BIAS; not stored in the checkpoint).
LOGIT_BIAS = 2.65
#: An image sits between these two tokens (Qwen2's ids; the GGUF release keeps them).
VISION_START_ID = 151652
VISION_END_ID = 151653
#: The prompt template: `DOC_PREFIX + document + QUERY_PREFIX + query`, then the scoring token.
DOC_PREFIX = "**Document**:\n"
QUERY_PREFIX = "\n**Query**:\n"

# --- where the files are ---------------------------------------------------------------------
DEFAULT_REPO = "jinaai/jina-reranker-m0-GGUF"
DEFAULT_QUANT = "F16"
HEAD_FILE = "mlp_weights.npz"

# --- truncation (the original model's) ---------------------------------------------------------
MAX_LENGTH = 10240
MAX_QUERY_LENGTH = 512

# --- long documents: chunking (opt-in; the default is truncation) ------------------------------
#: Overlap of consecutive chunks (at most half a chunk), chunks per document at most, and how chunk scores combine.
#: A chunk's size defaults to all the room a prompt leaves (max_length minus template, query, scoring token).
CHUNK_OVERLAP = 256
MAX_CHUNKS = 64
CHUNK_AGGREGATE = "max"
CHUNK_AGGREGATES = ("max", "mean", "first")

# --- the backbone ------------------------------------------------------------------------------
#: Tokens per `llama_decode` call by device (`n_batch=None`), sequences per call, physical batch sizes.
#: On the CPU a call is one physical batch: the prompts packed in a call share its KV cache, and
#: llama.cpp's CPU attention visits (masked) every cell filled earlier in the call, so a 2048-token
#: call spent 35% more on attention than 512-token ones at the m0 shape (benchmarks/RESULTS.md).
N_BATCH_CPU = 512
N_BATCH_GPU = 2048
N_SEQ_MAX = 64
N_UBATCH_GPU = 1024
N_UBATCH_CPU = 512
#: The fast path's identity output projection: "f32" gives embedding mode's hidden states.
IDENTITY_DTYPE = "f32"
IDENTITY_DTYPES = ("f16", "f32")

# --- the API and the job ---------------------------------------------------------------------
BATCH_SIZE = 64  # pairs per `compute_score` step (the backbone packs them into decode calls)
WINDOW = 2048  # pairs per job window: sorted by length for packing, checkpointed together
RUN_TAG = "jina-reranker-m0"
