"""The peer: the original model's computation in transformers, shared by every benchmark that compares with it.

transformers' Qwen2-VL text model + the checkpoint's score head on our prompt ids: left padding (as
the original processor pads), position ids from the mask, the last token's hidden state, then
`sigmoid(score(h) - logit_bias)`. `run_transformers` times every configuration asked for, so a
benchmark can compare with the fastest one (the peer at its strongest) and print the others beside it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD_ID = 151643  # <|endoftext|>, Qwen2-VL's pad token; masked out anyway


def _oracle():
    sys.path.insert(0, os.path.join(_ROOT, "tests"))
    import oracle

    return oracle


def load_transformers(ckpt: Path, dtype_name: str = "bf16", attn: str = "sdpa", device: str = "cpu"):
    """(text model, score head) of the original-layout checkpoint, in `dtype_name` (bf16 or fp32), on `device`."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    sd = load_file(str(Path(ckpt) / "model.safetensors"))
    config = _oracle().text_config(Path(ckpt))
    config._attn_implementation = attn
    with torch.device("meta"):
        model = Qwen2VLTextModel(config)
    model.load_state_dict({k[6:]: v.to(dtype) for k, v in sd.items() if k.startswith("model.")}, strict=True, assign=True)
    model.rotary_emb = type(model.rotary_emb)(config=config)  # its inv_freq buffer stays float32
    hidden = sd["score.0.weight"].shape[1]
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)).eval()
    head.load_state_dict({k[6:]: v.float() for k, v in sd.items() if k.startswith("score.")})
    return model.to(device).eval(), head.to(device, dtype)  # the weights are `dtype` already


def transformers_scorer(model, head, device: str = "cpu"):
    """scores(batch of id lists) -> float32 tensor on `device`, in the batch's order."""
    import torch

    logit_bias = _oracle().LOGIT_BIAS

    @torch.inference_mode()
    def scores(batch: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):  # left padding, as the original processor pads
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # Qwen2-VL's get_rope_index for text
        h = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  use_cache=False).last_hidden_state[:, -1]
        return torch.sigmoid(head(h).squeeze(-1).float() - logit_bias)

    return scores


def time_transformers(scores, ids: list[list[int]], batch: int, sort: bool, rounds: int,
                      sync=lambda: None) -> tuple[np.ndarray, float, int]:
    """(scores in input order, best wall seconds of `rounds` after one warm batch, tokens with padding)."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
    batches = [[ids[i] for i in order[s:s + batch]] for s in range(0, len(ids), batch)]
    scores(batches[0])
    best, out = None, None
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        out = [scores(b) for b in batches]
        sync()
        wall = time.perf_counter() - t
        best = wall if best is None else min(best, wall)
    got = np.empty(len(ids), dtype=np.float32)
    got[order] = torch.cat(out).cpu().numpy()
    return got, best, sum(len(b) * max(len(x) for x in b) for b in batches)


def run_transformers(ckpt: Path, ids: list[list[int]], threads: int, dtypes, attns, batch_sizes, rounds: int,
                     orders=(True, False)) -> list[dict]:
    """Every (dtype, attention, sorted, batch size) configuration on the CPU; tokens/s counts real prompt tokens only."""
    import torch

    torch.set_num_threads(threads)
    tokens = sum(len(x) for x in ids)
    rows = []
    for dtype_name in dtypes:
        for attn in attns:
            scores = transformers_scorer(*load_transformers(ckpt, dtype_name, attn))
            for sort in orders:
                for bs in batch_sizes:
                    got, best, padded = time_transformers(scores, ids, bs, sort, rounds)
                    rows.append({"dtype": dtype_name, "attn": attn, "sorted": sort, "batch": bs, "seconds": best,
                                 "tokens_per_s": tokens / best, "padded_tokens": padded, "scores": got})
                    print(f"  transformers {dtype_name} {attn} {'sorted' if sort else 'input order'} batch {bs}: "
                          f"{tokens / best:.1f} tok/s", file=sys.stderr, flush=True)
    return rows
