"""`reranker cache list|clear [--stale]`: the fast path's cached GGUF copies (one n_vocab x hidden matrix each)."""

from __future__ import annotations

import argparse


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> None:
    from reranker.engine.identity import cached_copies, clear_cache, default_cache_dir

    folder = args.dir or default_cache_dir()
    if args.action == "clear":
        removed = clear_cache(folder, stale_only=args.stale)
        for c in removed:
            print(f"removed {c.path}")
        print(f"removed {len(removed)} cached cop{'y' if len(removed) == 1 else 'ies'} ({_size(sum(c.size for c in removed))}) from {folder}")
        return
    copies = cached_copies(folder)
    for c in copies:
        status = "stale" if c.stale else "current"
        print(f"{_size(c.size):>9}  {status:<7}  {c.path}  <- {c.source or 'unknown source'}")
    print(f"{len(copies)} cached cop{'y' if len(copies) == 1 else 'ies'} ({_size(sum(c.size for c in copies))}, "
          f"{sum(c.stale for c in copies)} stale) in {folder}")
    if copies:
        # "current" says nothing about whether a process has the copy open: only that it would be reused. A copy is
        # found by its source's bytes, wherever that file is: a moved model loaded from its new place reuses it.
        print("current: a GGUF with the bytes it was made from is known here; stale: none is known (the source was "
              "moved, changed or deleted; a GGUF with those bytes loaded from any path reuses the copy), or an older "
              "version made it (never reused); `reranker cache clear --stale` removes the stale ones")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `cache` command (list or clear the identity-output copies) to `reranker`'s subparsers."""
    p = sub.add_parser("cache", help="list or clear the fast path's cached GGUF copies",
                       description="The fast path writes one copy of each GGUF it loads, with an identity output "
                                   "projection, into $RERANKER_CACHE (default ~/.cache/jina-reranker-gguf). A copy is "
                                   "keyed by its source's bytes, whatever the path: a GGUF with those bytes, loaded from any "
                                   "path, reuses it. A copy is stale when no GGUF with its bytes is known here (its source was "
                                   "moved, changed or deleted), or when an older version made it (never reused).")
    p.add_argument("action", choices=("list", "clear"), help="list the copies, or delete them")
    p.add_argument("--stale", action="store_true", help="clear only the stale copies")
    p.add_argument("--dir", default=None, help="the cache folder (default: $RERANKER_CACHE or ~/.cache/jina-reranker-gguf)")
    p.set_defaults(func=run)
