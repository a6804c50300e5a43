"""`reranker embed`: llama-embedding's command line and output, for scripts written against it.

Takes the batch files of the GGUF release's recipe (prompts already formatted, each ending
with `<|box_end|>`, split on `--embd-separator`) and writes the bytes llama-embedding prints
for `--pooling last --embd-normalize -1 --embd-output-format json|array|raw`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from .errors import RerankerError
from .hub import DEFAULT_REPO
from .output_files import open_output
from .prompts import DOC_PREFIX, MAX_LENGTH, QUERY_PREFIX
from .tokenizer import SCORE_TOKEN_ID, SCORE_TOKEN_TEXT

if TYPE_CHECKING:
    from .backbone import Backbone
    from .tokenizer import GGUFTokenizer

FORMATS = ("json", "array", "raw", "npy")
CHUNK = 256  # prompts per backbone call: bounds memory, not speed (the backbone packs them itself)
_TEMPLATE = f"{DOC_PREFIX}{{doc}}{QUERY_PREFIX}{{query}}{SCORE_TOKEN_TEXT}".encode("unicode_escape").decode()

# llama.cpp's string_process_escapes, applied to the prompt text (from -p or -f) by default.
_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"'": b"'", b'"': b'"', b"\\": b"\\"}


def process_escapes(data: bytes) -> bytes:
    """`\\n`, `\\r`, `\\t`, `\\'`, `\\"`, `\\\\` and `\\xHH` decoded as llama.cpp does; other backslashes kept."""

    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if len(code) == 3:
            return bytes([int(code[1:], 16)])
        return m.group(0)

    return _ESCAPE.sub(one, data)


def split_prompts(data: bytes, separator: str = "\n", *, escape: bool = True, source: str = "the prompt") -> list[str]:
    """Prompt texts as llama-embedding splits them: escapes processed, then split on `separator`.

    A trailing empty piece (the file ends with the separator) is dropped; llama-embedding
    would embed it as an empty prompt.
    """
    if not separator:
        raise RerankerError("--embd-separator is empty; give the string between prompts, e.g. '<#sep#>'")
    if escape:
        data = process_escapes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = " (after escape processing: a \\xHH escape made invalid UTF-8; pass --no-escape)" if escape else ""
        raise RerankerError(f"{source} is not valid UTF-8 at byte {e.start}{hint}; re-encode it as UTF-8") from e
    prompts = text.split(separator)
    if len(prompts) > 1 and prompts[-1] == "":
        prompts.pop()
    return prompts


def prompt_text(prompt: str, index: int, separator: str = "\n") -> str:
    """The prompt without its trailing `<|box_end|>`, which must be there: the head scores that token's state."""
    if not prompt.endswith(SCORE_TOKEN_TEXT):
        raise RerankerError(
            f"prompt {index} does not end with {SCORE_TOKEN_TEXT} (it ends with {prompt[-30:]!r}), so its last hidden "
            f"state is not the scoring state and its score would be meaningless; end every prompt with "
            f"{SCORE_TOKEN_TEXT} ('{_TEMPLATE}') and check that --embd-separator {separator!r} is what separates the prompts"
        )
    return prompt[: -len(SCORE_TOKEN_TEXT)]


def prompt_ids(tokenizer: "GGUFTokenizer", prompt: str, index: int, n_ctx: int, separator: str = "\n") -> np.ndarray:
    """Token ids of one formatted prompt: its text as plain text, then the scoring token id 100.

    llama-embedding parses special tokens in the whole prompt; here only the final
    `<|box_end|>` is special, so text inside a document stays text (as in `Reranker`).
    """
    ids = tokenizer.encode(prompt_text(prompt, index, separator))
    ids.append(SCORE_TOKEN_ID)
    if len(ids) > n_ctx:
        raise RerankerError(
            f"prompt {index} has {len(ids)} tokens, more than the context (n_ctx={n_ctx}); raise --n-ctx or shorten "
            "the document (embed never truncates, as llama-embedding; `reranker rerank` does)"
        )
    return np.asarray(ids, dtype=np.int32)


def embed_chunks(backbone: "Backbone", sequences: Sequence[np.ndarray], *, chunk_size: int = CHUNK,
                 show_progress: bool = False) -> Iterator[np.ndarray]:
    """Last-token hidden states of `sequences`, in order, as float32 (k, n_embd) chunks of up to `chunk_size` rows."""
    from tqdm.auto import tqdm

    with tqdm(total=len(sequences), disable=not show_progress, unit="prompt", desc="Embedding", file=sys.stderr) as bar:
        for start in range(0, len(sequences), chunk_size):
            rows = backbone.embed(sequences[start : start + chunk_size])
            bar.update(len(rows))
            yield rows


def format_embeddings(chunks: Iterable[np.ndarray], fmt: str = "json") -> Iterator[str]:
    """llama-embedding's output for `--embd-output-format fmt` (json, array or raw), piece by piece.

    Values are printed with `%1.7f` as llama-embedding does for `--embd-normalize -1`;
    the layout (indentation, key order, the blank line at the end) is byte for byte its stdout.
    """
    if fmt not in ("json", "array", "raw"):
        raise RerankerError(f"text output format {fmt!r} is not one of json, array, raw")
    yield {"json": '{\n  "object": "list",\n  "data": [\n', "array": "[", "raw": ""}[fmt]
    j = 0
    for chunk in chunks:
        for row in chunk.tolist():
            if fmt == "raw":
                yield " ".join(["%.7f" % v for v in row]) + "\n"
                continue
            values = ",".join(["%.7f" % v for v in row])
            if fmt == "json":
                yield (",\n" if j else "") + f'    {{\n      "object": "embedding",\n      "index": {j},\n      "embedding": [{values}]\n    }}'
            else:
                yield ("," if j else "") + f"[{values}]"
            j += 1
    yield {"json": "\n  ]\n}\n\n", "array": "]\n\n", "raw": "\n"}[fmt]


def write_npy(path: str, chunks: Iterable[np.ndarray], n: int, n_embd: int) -> None:
    """Stream float32 (n, n_embd) rows into a .npy file without holding them all."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, n_embd))
    start = 0
    for rows in chunks:
        out[start : start + len(rows)] = rows
        start += len(rows)
    out.flush()
    del out


def read_input(args: argparse.Namespace) -> tuple[bytes, str]:
    """The raw prompt text from -p or -f (stdin for `-f -`), with the file's one trailing newline removed."""
    if (args.prompt is None) == (args.file is None):
        raise RerankerError("give the prompts with either -f FILE (a batch file) or -p PROMPT, not both or neither")
    if args.prompt is not None:
        return args.prompt.encode("utf-8", errors="surrogateescape"), "-p"
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


def cmd_embed(args: argparse.Namespace) -> None:
    """Run `reranker embed` from parsed arguments."""
    from tqdm.auto import tqdm

    from .backbone import Backbone
    from .hub import resolve

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


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add the `embed` command (llama-embedding's options and output) to `reranker`'s subparsers."""
    p = subparsers.add_parser(
        "embed", help="llama-embedding compatible: formatted prompts -> last hidden states (json, array, raw, npy)",
        description="Embed prompts that are already formatted ('**Document**:\\n{doc}\\n**Query**:\\n{query}<|box_end|>') "
                    "and print them as llama-embedding --pooling last --embd-normalize -1 does.")
    p.add_argument("-m", "--model", "-hf", "--hf-repo", dest="model", default=DEFAULT_REPO,
                   help="a local .gguf, a folder, or a Hub id like jinaai/jina-reranker-m0-GGUF:F16 (default: %(default)s)")
    p.add_argument("-f", "--file", help="a batch file of prompts separated by --embd-separator ('-' reads stdin)")
    p.add_argument("-p", "--prompt", help="prompts given inline (split on --embd-separator too)")
    p.add_argument("--embd-separator", default="\n", help="the string between prompts (default: newline, as llama-embedding)")
    p.add_argument("--embd-output-format", choices=FORMATS, default=None,
                   help="json (OpenAI-style, default), array ([[...],...]), raw (one line per embedding), npy (needs -o)")
    p.add_argument("--pooling", default="last", help="only 'last' is accepted (the model scores the last token)")
    p.add_argument("--embd-normalize", type=int, default=-1, help="only -1 (none) is accepted: the head needs raw states")
    p.add_argument("--no-escape", dest="escape", action="store_false",
                   help="do not decode \\n, \\t, \\xHH ... in the prompts (llama.cpp decodes them by default)")
    p.add_argument("-e", "--escape", dest="escape", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout); written whole or not at all")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=-1,
                   help="layers to offload to the GPU; -1 all (default), 0 none")
    p.add_argument("-c", "--n-ctx", "--ctx-size", dest="n_ctx", type=int, default=MAX_LENGTH,
                   help="context size in tokens: the longest prompt allowed (default: %(default)s)")
    p.add_argument("-b", "--n-batch", "--batch-size", dest="n_batch", type=int, default=2048,
                   help="tokens per decode call (default: %(default)s)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    p.set_defaults(func=cmd_embed)
    return p
