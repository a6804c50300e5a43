"""Text <-> token ids with the GGUF's own vocabulary, safe against special-token injection."""

from __future__ import annotations

import ctypes
import threading
import unicodedata

import llama_cpp
import numpy as np

from reranker.defaults import ORIGINAL_BOX_END_ID, SCORE_TOKEN_ID, SCORE_TOKEN_TEXT
from reranker.errors import RerankerError
from reranker.options import SURROGATE_FIX, lone_surrogate


class GGUFTokenizer:
    """Tokenises user text as plain text (never as special tokens), like the original model.

    Text is NFC-normalised first, as the Qwen2 `tokenizer.json` does. In a GGUF with the
    release's vocabulary swap, the byte token that used to be id 100 now tokenises to
    151649; it is mapped back to 100 so ids (and embeddings) equal the original model's.

    Thread-safe: every call holds `lock` (its buffer is shared). Tokenising may run beside a
    decode; the owner takes `lock` while it frees the model, and `release()` makes later calls raise.
    """

    def __init__(self, vocab: llama_cpp.llama_vocab_p, lock: threading.RLock | None = None) -> None:
        self._vocab = vocab
        self.lock = lock or threading.RLock()
        self.owner: object = None  # keeps whatever owns `vocab` alive
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.swapped = self.token_text(SCORE_TOKEN_ID) == SCORE_TOKEN_TEXT
        self._buf = (llama_cpp.llama_token * 4096)()

    def release(self) -> None:
        """Forget the vocabulary: its owner is about to free the model."""
        with self.lock:
            self._vocab = None

    def _live_vocab(self) -> llama_cpp.llama_vocab_p:
        if self._vocab is None:
            raise RerankerError("this tokenizer's model was freed (its Backbone or VocabOnly is closed); load the model again")
        return self._vocab

    def token_text(self, token: int) -> str:
        with self.lock:
            raw = llama_cpp.llama_vocab_get_text(self._live_vocab(), token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings included as ordinary text."""
        try:
            data = unicodedata.normalize("NFC", text).encode("utf-8")
        except UnicodeEncodeError:
            raise RerankerError(f"the text holds {lone_surrogate(text)}; {SURROGATE_FIX}") from None
        with self.lock:
            vocab = self._live_vocab()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), self._buf, len(self._buf), False, False)
            if n < 0:
                self._buf = (llama_cpp.llama_token * (-n + 16))()
                n = llama_cpp.llama_tokenize(vocab, data, len(data), self._buf, len(self._buf), False, False)
            ids = np.ctypeslib.as_array(self._buf)[:n].tolist()
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
        with self.lock:
            vocab = self._live_vocab()
            for t in ids:
                n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                out.append(buf.raw[:n])
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; an incomplete UTF-8 character at the end is dropped."""
        return self.decode_bytes(ids).decode("utf-8", errors="ignore")
