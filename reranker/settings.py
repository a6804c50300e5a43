"""`LoadSettings`: every option of loading a model, typed, checked once, in one object.

`Reranker.from_settings(s)` loads it (`from_pretrained(**kwargs)` builds one), the CLI builds it
from its arguments (`LoadSettings.from_args`), and the job's device processes, Ray actors and the
server receive it whole. A job's fingerprint takes its model-settings part from `fingerprint()`.

Importing or building one loads neither llama.cpp nor torch: the checks are `reranker.options`'.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from reranker.defaults import BATCH_SIZE, DEFAULT_REPO, IDENTITY_DTYPE, MAX_LENGTH, MAX_QUERY_LENGTH, N_SEQ_MAX
from reranker.errors import RerankerError
from reranker.options import check_lengths, check_settings, require_int


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """`Reranker.from_pretrained`'s options (see its docstring for each); checked when built.

    `head`: a path, or a `head.ScoringHead` (then the settings hold the module, and do not pickle
    cheaply; the job and the server take paths). `device`: a torch device or its name.

    Two settings left to auto are decided where the model loads, from the environment there:
    `n_threads=None` is `RERANKER_THREADS` or the idle cores of that machine, `bf16=None` is
    `RERANKER_BF16` or what its CPU does natively. A job fixes `bf16` once, in its driver
    (`decide_bf16`), so that all its processes load the same copy; threads stay per machine.
    """

    model: str = DEFAULT_REPO
    quant: str | None = None
    head: Any = None
    device: Any = None
    n_ctx: int | None = None
    n_batch: int | None = None
    n_seq_max: int = N_SEQ_MAX
    n_gpu_layers: int = -1
    n_threads: int | None = None
    flash_attn: bool | None = None
    kv_type: str | None = None
    fast: bool = True
    identity_dtype: str = IDENTITY_DTYPE
    bf16: bool | None = None
    max_length: int | None = None
    max_query_length: int = MAX_QUERY_LENGTH
    batch_size: int = BATCH_SIZE
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool | None = None
    deterministic: bool = False
    mmproj: str | os.PathLike | None = None
    max_doc_length: int | None = None

    def __post_init__(self) -> None:
        # Every setting is checked before any file is read, with the messages from_pretrained always gave.
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model or "\0" in self.model:
            raise RerankerError(f"model={self.model!r} is not a model: pass a .gguf path, a folder holding one, "
                                "or a Hub id like 'jinaai/jina-reranker-m0-GGUF:Q8_0'")
        if self.quant is not None and not isinstance(self.quant, str):
            raise RerankerError(f"quant={self.quant!r} must be a level name such as 'Q8_0', or None")
        for name in ("fast", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise RerankerError(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("flash_attn", "bf16", "local_files_only"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise RerankerError(f"{name}={getattr(self, name)!r} must be True, False or None (automatic)")
        check_lengths(self.max_length, self.max_query_length, self.max_doc_length)
        require_int("batch_size", self.batch_size, 1)
        check_settings(n_ctx=self.n_ctx, n_batch=self.n_batch, n_seq_max=self.n_seq_max, n_threads=self.n_threads,
                       n_gpu_layers=self.n_gpu_layers, kv_type=self.kv_type)
        if self.bf16 and not self.fast:
            raise RerankerError("bf16=True re-encodes the fast path's cached copy; it needs fast=True")

    @property
    def prompt_length(self) -> int:
        """The `max_length` in effect: the given one, else 10240, or `n_ctx` when that is given and smaller."""
        if self.max_length is not None:
            return self.max_length
        return min(MAX_LENGTH, self.n_ctx) if self.n_ctx else MAX_LENGTH

    def replace(self, **changes: Any) -> LoadSettings:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change a job's scores, for its fingerprint (a resume with others is refused).

        `bf16` is the decided choice (see `decide_bf16`); the device, threads and batch sizes move
        scores only within llama.cpp's tolerance and may change between runs. Keys that are off are
        left out, so the fingerprints of jobs started before they existed still match.
        """
        out: dict[str, Any] = {"fast": self.fast, "identity_dtype": self.identity_dtype}
        if self.bf16:  # BF16 mat-muls round activations differently: a job is not resumed across the two
            out["bf16"] = True
        if self.deterministic:  # other summation orders: a job is not resumed across the two either
            out["deterministic"] = True
        return out

    def decide_bf16(self, gguf: str | os.PathLike) -> LoadSettings:
        """These settings with `bf16` decided (True/False) for `gguf`, so every process of a job loads the same copy."""
        from reranker.engine.identity import use_bf16

        bf16, _ = use_bf16(self.bf16, self.n_gpu_layers, gguf) if self.fast else (False, "")
        return self.replace(bf16=bf16)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> LoadSettings:
        """The settings of the CLI's model options (`cli.common.add_model_args`); `overrides` win."""
        values = dict(model=args.model, head=getattr(args, "head", None), device=getattr(args, "device", None),
                      n_ctx=args.n_ctx, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                      max_length=args.max_length, max_query_length=args.max_query_length,
                      max_doc_length=getattr(args, "max_doc_length", None),
                      bf16={"auto": None, "on": True, "off": False}[getattr(args, "bf16", "auto")],
                      deterministic=getattr(args, "deterministic", False), mmproj=getattr(args, "mmproj", None))
        return cls(**{**values, **overrides})
