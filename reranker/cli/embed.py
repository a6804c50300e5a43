"""`reranker embed`: llama-embedding's command line (`--pooling last --embd-normalize -1`) and output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reranker.atomic import open_output
from reranker.compat.embed import FORMATS, embed_chunks, format_embeddings, prompt_ids, prompt_text, split_prompts, write_npy
from reranker.defaults import DEFAULT_REPO, MAX_LENGTH, N_BATCH_CPU, N_BATCH_GPU, SCORE_TOKEN_TEXT
from reranker.errors import RerankerError


def read_input(args: argparse.Namespace) -> tuple[bytes, str]:
    """The raw prompt text from -p or -f (stdin for `-f -`), with the file's one trailing newline removed."""
    if (args.prompt is None) == (args.file is None):
        raise RerankerError("give the prompts with either -f FILE (a batch file) or -p PROMPT, not both or neither")
    if args.prompt is not None:
        return args.prompt.encode("utf-8", errors="surrogateescape"), "-p"
    if args.file == "-" and sys.stdin is None:
        raise RerankerError("-f -: standard input is closed; give the prompts in a file, -f FILE")
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as e:
        raise RerankerError(f"cannot read prompt file {args.file}: {e.strerror or e}") from e
    # llama.cpp's -f drops exactly one trailing newline.
    return (data[:-1] if data.endswith(b"\n") else data), args.file


def check_options(args: argparse.Namespace) -> str:
    """Reject options that would make the embeddings useless to the head; returns the output format."""
    if args.pooling != "last":
        raise RerankerError(
            f"--pooling {args.pooling}: jina-reranker-m0 scores the hidden state of the last token ({SCORE_TOKEN_TEXT}), "
            "so only --pooling last gives embeddings the head can score; use --pooling last (the default)"
        )
    if args.embd_normalize != -1:
        raise RerankerError(
            f"--embd-normalize {args.embd_normalize}: the scoring head needs the raw hidden states, and normalising "
            "them changes every score; use --embd-normalize -1 (the default here)"
        )
    fmt = args.embd_output_format or ("npy" if args.output and args.output.endswith(".npy") else "json")
    if fmt == "npy" and (args.output is None or args.output == "-"):
        raise RerankerError("--embd-output-format npy writes a binary file; give it with -o FILE.npy")
    return fmt


def run(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from reranker.engine.backbone import Backbone
    from reranker.gguf.hub import resolve
    from reranker.options import check_settings

    check_settings(n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers)
    fmt = check_options(args)
    data, source = read_input(args)
    prompts = split_prompts(data, args.embd_separator, escape=args.escape, source=source)
    del data
    for i, p in enumerate(prompts):  # fail on a malformed file before loading the model
        prompt_text(p, i, args.embd_separator)
    files = resolve(args.model)
    show = not args.quiet and sys.stderr.isatty()
    with Backbone(files.gguf, n_ctx=args.n_ctx, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers,
                  n_threads=args.threads) as backbone:
        # Tokenise everything first, so a prompt too long fails before any output is written.
        sequences = [prompt_ids(backbone.tokenizer, p, i, backbone.n_ctx, args.embd_separator)
                     for i, p in enumerate(tqdm(prompts, disable=not show, unit="prompt", desc="Tokenising", file=sys.stderr))]
        del prompts
        chunks = embed_chunks(backbone, sequences, show_progress=show)
        binary = fmt == "npy"
        with open_output(args.output, binary=binary) as (stream, tmp):
            if binary:
                write_npy(tmp, chunks, len(sequences), backbone.n_embd)
            else:
                for piece in format_embeddings(chunks, fmt):
                    stream.write(piece)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `embed` command (llama-embedding's options and output) to `reranker`'s subparsers."""
    p = sub.add_parser(
        "embed", help="llama-embedding compatible: formatted prompts -> last hidden states (json, array, raw, npy)",
        description="Embed prompts that are already formatted ('**Document**:\\n{doc}\\n**Query**:\\n{query}<|box_end|>') "
                    "and print them as llama-embedding --pooling last --embd-normalize -1 does.")
    p.add_argument("-m", "--model", "-hf", "--hf-repo", dest="model", default=DEFAULT_REPO,
                   help="a local .gguf, a folder, or a Hub id like jinaai/jina-reranker-m0-GGUF:F16 (default: %(default)s)")
    p.add_argument("-f", "--file", help="a batch file of prompts separated by --embd-separator ('-' reads stdin)")
    p.add_argument("-p", "--prompt", help="prompts given inline (split on --embd-separator too)")
    p.add_argument("--embd-separator", default="\n", help="the string between prompts (default: newline, as llama-embedding)")
    p.add_argument("--embd-output-format", choices=FORMATS, default=None,
                   help="json (OpenAI-style; the default, npy for -o FILE.npy), array ([[...],...]), raw (one line per "
                        "embedding), npy (needs -o)")
    p.add_argument("--pooling", default="last", help="only 'last' is accepted (the model scores the last token)")
    p.add_argument("--embd-normalize", type=int, default=-1, help="only -1 (none) is accepted: the head needs raw states")
    p.add_argument("--no-escape", dest="escape", action="store_false",
                   help="do not decode \\n, \\t, \\xHH ... in the prompts (llama.cpp decodes them by default)")
    p.add_argument("-e", "--escape", dest="escape", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout); written whole or not at all")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=-1,
                   help="layers to offload to the GPU; -1 all (default), 0 none")
    p.add_argument("-c", "--n-ctx", "--ctx-size", dest="n_ctx", type=int, default=MAX_LENGTH,
                   help="context size in tokens, the longest prompt allowed; llama.cpp rounds it up to a multiple of "
                        "256 (default: %(default)s)")
    p.add_argument("-b", "--n-batch", "--batch-size", dest="n_batch", type=int, default=None,
                   help=f"tokens per decode call (default: {N_BATCH_CPU} on the CPU, {N_BATCH_GPU} on a GPU)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: the physical cores less those other processes keep busy now)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    p.set_defaults(func=run)
