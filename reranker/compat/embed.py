"""llama-embedding's prompt files and output formats, for scripts written against it (`reranker embed`).

Takes the batch files of the GGUF release's recipe (prompts already formatted, each ending
with `<|box_end|>`, split on `--embd-separator`) and writes the bytes llama-embedding prints
for `--pooling last --embd-normalize -1 --embd-output-format json|array|raw`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from reranker.defaults import DOC_PREFIX, QUERY_PREFIX, SCORE_TOKEN_ID, SCORE_TOKEN_TEXT
from reranker.errors import RerankerError

if TYPE_CHECKING:
    from reranker.engine.backbone import Backbone
    from reranker.engine.tokenizer import GGUFTokenizer

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
    try:
        data.decode("utf-8")  # the file itself first: an escape is to blame only when the file was valid
    except UnicodeDecodeError as e:
        raise RerankerError(f"{source} is not valid UTF-8 at byte {e.start}; re-encode it as UTF-8") from e
    if escape:
        data = process_escapes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RerankerError(f"{source}: a \\xHH escape makes invalid UTF-8 (byte {e.start} after escape processing); "
                            "fix the escape, or pass --no-escape to take backslashes literally") from e
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
