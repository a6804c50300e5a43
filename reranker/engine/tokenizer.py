"""Text <-> token ids with the GGUF's own vocabulary, safe against special-token injection."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import re
import threading
import unicodedata
from collections.abc import Iterator

import llama_cpp
import numpy as np

from reranker.defaults import ORIGINAL_BOX_END_ID, SCORE_TOKEN_ID, SCORE_TOKEN_TEXT
from reranker.errors import RerankerError
from reranker.options import SURROGATE_FIX, lone_surrogate

#: Characters per llama_tokenize call on long text: a request's tokenising can stop between two
#: calls (about 20-50 ms of work each), and no call holds anything other requests need.
PIECE_CHARS = 16_384

# Where a text can be cut so that its two sides tokenise to the ids of the whole (Qwen2's
# pre-tokeniser, which BPE merges never cross): before a space (U+0020) that follows a character
# no pre-token rule carries over a space (an ASCII non-space, or a letter or digit; the rules
# that take whitespace along start at whitespace, and punctuation keeps only newlines after it).
# The space then starts the next pre-token, whatever follows it, and the pre-tokeniser reads no
# character before the one it starts at. Tested against whole-text tokenisation on hostile text.
# Public: `prompts` reuses a long document's own ids up to its last such point.
SAFE_CUT = re.compile(r"(?<=[!-~]|[^\W_])(?= )")


class Cancelled(Exception):
    """The request this tokenising was for has been given up (timed out, or its client left)."""


#: The event that, once set, makes `encode` and `pieces` in this context raise `Cancelled` (None: never).
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("reranker_tokenize_cancel", default=None)


@contextlib.contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Tokenising in this block stops with `Cancelled` once `event` is set (checked between calls into llama.cpp)."""
    token = CANCEL.set(event)
    try:
        yield
    finally:
        CANCEL.reset(token)


def check_cancelled() -> None:
    event = CANCEL.get()
    if event is not None and event.is_set():
        raise Cancelled("tokenising was cancelled: its request was given up")


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters (longer where no cut is safe) at `SAFE_CUT` points."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        m = SAFE_CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start : m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


class GGUFTokenizer:
    """Tokenises user text as plain text (never as special tokens), like the original model.

    Text is NFC-normalised first, as the Qwen2 `tokenizer.json` does. In a GGUF with the
    release's vocabulary swap, the byte token that used to be id 100 now tokenises to
    151649; it is mapped back to 100 so ids (and embeddings) equal the original model's.

    Thread-safe without serialising callers: llama.cpp's tokenizer only reads the vocabulary, so
    each call has its own buffer and many requests tokenise at once (a long text never makes a
    short one wait). `lock` guards the vocabulary's lifetime: `release()` (taken by the owner
    before it frees the model) waits for the calls in progress, and makes later calls raise.
    Long text is tokenised in pieces (`text_pieces`), so `cancelled_by` can stop it between two.
    """

    def __init__(self, vocab: llama_cpp.llama_vocab_p, lock: threading.RLock | None = None) -> None:
        self._vocab = vocab
        self.lock = lock or threading.RLock()
        self._idle = threading.Condition(self.lock)
        self._users = 0  # calls using the vocabulary now
        self.owner: object = None  # keeps whatever owns `vocab` alive
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.swapped = self.token_text(SCORE_TOKEN_ID) == SCORE_TOKEN_TEXT

    def release(self) -> None:
        """Forget the vocabulary once no call uses it: its owner is about to free the model."""
        with self.lock:
            self._vocab = None
            while self._users:
                self._idle.wait()

    @contextlib.contextmanager
    def _using(self) -> Iterator[llama_cpp.llama_vocab_p]:
        with self.lock:
            if self._vocab is None:
                raise RerankerError("this tokenizer's model was freed (its Backbone or VocabOnly is closed); load the model again")
            self._users += 1
            vocab = self._vocab
        try:
            yield vocab
        finally:
            with self.lock:
                self._users -= 1
                if not self._users:
                    self._idle.notify_all()

    def token_text(self, token: int) -> str:
        with self._using() as vocab:
            raw = llama_cpp.llama_vocab_get_text(vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def encode(self, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
        """Token ids of `text`, special-token strings included as ordinary text.

        Text longer than `piece_chars` goes to llama.cpp in pieces cut where the ids stay those
        of the whole text; `Cancelled` when the context's `CANCEL` event is set before a piece.
        """
        check_cancelled()
        try:
            text = unicodedata.normalize("NFC", text)
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RerankerError(f"the text holds {lone_surrogate(text)}; {SURROGATE_FIX}") from None
        ids: list[int] = []
        with self._using() as vocab:
            for i, piece in enumerate(text_pieces(text, piece_chars)):
                if i:
                    check_cancelled()
                ids += _tokenize(vocab, piece.encode("utf-8"))
        if self.swapped and ORIGINAL_BOX_END_ID in ids:
            ids = [SCORE_TOKEN_ID if t == ORIGINAL_BOX_END_ID else t for t in ids]
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of `ids` as plain text pieces (used to cut text at a token boundary)."""
        return b"".join(self.pieces(ids))

    def pieces(self, ids: list[int]) -> list[bytes]:
        """The bytes of each token of `ids` (a piece may hold part of a UTF-8 character)."""
        if self.swapped:
            ids = [ORIGINAL_BOX_END_ID if t == SCORE_TOKEN_ID else t for t in ids]
        out = []
        buf = ctypes.create_string_buffer(256)
        with self._using() as vocab:
            for k, t in enumerate(ids):
                if not k % 4096:
                    check_cancelled()
                n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                out.append(buf.raw[:n])
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; an incomplete UTF-8 character at the end is dropped."""
        return self.decode_bytes(ids).decode("utf-8", errors="ignore")


def _tokenize(vocab: llama_cpp.llama_vocab_p, data: bytes) -> list[int]:
    # A text of n bytes has at most n tokens (each token is at least one byte): one call, no retry.
    buf = (llama_cpp.llama_token * (len(data) + 1))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    if n < 0:  # cannot happen by the bound above; kept so a surprise is an error, not lost ids
        raise RuntimeError(f"llama_tokenize needs {-n} tokens for {len(data)} bytes")
    return np.ctypeslib.as_array(buf)[:n].tolist()
