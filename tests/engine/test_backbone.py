"""llama.cpp's last-token hidden state against transformers' Qwen2-VL on the same checkpoint.

Prompt ids come from the reference (tests/oracle.py), not from the library's prompt builder, and
the tolerances are the reference's (oracle.HIDDEN_RTOL).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAIRS
from oracle import assert_hidden_close, rel_err

from reranker.engine.backbone import Backbone
from reranker.engine.identity import with_identity_output


@pytest.mark.parametrize("fast", [False, True], ids=["embedding-mode", "fast"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_last_hidden_state_matches_transformers(tiny_ggufs, reference, outtype, fast):
    path = with_identity_output(tiny_ggufs[outtype], "f32") if fast else tiny_ggufs[outtype]
    seqs = [reference.ids(q, d) for q, d in PAIRS]
    with Backbone(path, n_ctx=2048, n_batch=512, fast=fast) as backbone:
        got = backbone.embed(seqs)
    assert got.shape == (len(PAIRS), backbone.n_embd) and got.dtype == np.float32
    assert_hidden_close(got, reference.hidden_of_ids(seqs), outtype, f"{outtype} {'fast' if fast else 'embedding'} backbone")
    # Different prompts must give clearly different states, or the comparison proves little.
    assert min(rel_err(got[i], got[j]) for i in range(len(seqs)) for j in range(i)) > 0.05


def test_long_sequence_fed_in_chunks_matches_one_pass(tiny_ggufs, reference):
    ids = reference.ids("chunked", "some words here " * 150)
    assert len(ids) > 3 * 128
    with Backbone(tiny_ggufs["f32"], n_ctx=2048, n_batch=128) as backbone:
        got = backbone.embed([ids, ids[:50]])
    assert_hidden_close(got, reference.hidden_of_ids([ids, ids[:50]]), "f32", "a prompt fed in chunks of 128")


def test_a_kv_type_the_heads_cannot_hold_is_named(tiny_ggufs):
    # The tiny model's heads are 16 values wide; ggml's q8_0 blocks are 32: llama.cpp refuses the context, and the
    # message says why instead of suggesting a smaller n_ctx.
    from reranker import RerankerError

    with pytest.raises(RerankerError, match=r"kv_type='q8_0' needs a head size that is a multiple of 32, and .*'s is 16"):
        Backbone(tiny_ggufs["f16"], kv_type="q8_0", n_ctx=512)


def test_ctrl_c_while_llama_cpp_logs_a_load_stops_it(tiny_ggufs):
    import logging
    import os
    import signal

    class CtrlC(logging.Handler):  # a Ctrl-C arriving while llama.cpp logs, as during any model load
        def __init__(self):
            super().__init__()
            self.sent = False

        def emit(self, record):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    logger = logging.getLogger("reranker.llama")
    handler, level = CtrlC(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(KeyboardInterrupt):  # ctypes used to print it and drop it, and the load went on
            Backbone(tiny_ggufs["f16"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.sent
    Backbone(tiny_ggufs["f16"]).close()  # the interrupt is spent: the next load is not stopped by it
