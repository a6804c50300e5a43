"""Prompts with image embeddings in place of tokens: llama.cpp's M-RoPE decode against transformers.

No vision tower is needed to check the backbone's half of image scoring: random rows stand in for an
image's embeddings, and transformers' Qwen2-VL text model takes the same rows as `inputs_embeds` at
the positions its own `Qwen2VLModel.get_rope_index` computes for an image of that grid.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from oracle import SCORE_TOKEN_ID, assert_hidden_close
from tokenizers import Tokenizer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from reranker import RerankerError
from reranker.engine.backbone import Backbone
from reranker.engine.identity import with_identity_output
from reranker.engine.segments import Embeddings, PendingImage, Segments

IMAGE_PAD = "<|image_pad|>"


def template_tokenizer(checkpoint) -> Tokenizer:
    """The checkpoint's tokenizer as the original's processor runs it on its template: special-token strings parsed."""
    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def pieces(tiny_checkpoint, oracle):
    """A function (texts and grids -> (our Segments, the oracle's hidden state)) for the tiny checkpoint."""
    tok = template_tokenizer(tiny_checkpoint)
    pad = tok.token_to_id(IMAGE_PAD)
    table = oracle.embed_tokens.weight.detach()
    rng = np.random.default_rng(0)
    # transformers' own position rule, called on its class with just the config it reads
    rope_self = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    rope_self.get_vision_position_ids = lambda *a, **k: Qwen2VLModel.get_vision_position_ids(rope_self, *a, **k)

    def make(*items):
        parts, ids, kinds, embeds, grids = [], [], [], [], []
        for item in items:
            if isinstance(item, str):
                t = tok.encode(item, add_special_tokens=False).ids
                parts.append(t)
                ids += t
                kinds += [0] * len(t)
                embeds.append(table[t])
            else:
                ny, nx = item
                rows = (rng.standard_normal((ny * nx, table.shape[1])) * float(table.std())).astype(np.float32)
                parts.append(Embeddings(rows, nx=nx, ny=ny))
                ids += [pad] * (nx * ny)
                kinds += [1] * (nx * ny)
                embeds.append(torch.from_numpy(rows))
                grids.append([1, 2 * ny, 2 * nx])  # patches before the 2x2 merge
        parts.append([SCORE_TOKEN_ID])
        ids.append(SCORE_TOKEN_ID)
        kinds.append(0)
        embeds.append(table[[SCORE_TOKEN_ID]])
        input_ids = torch.tensor([ids])
        if grids:
            position_ids, _ = Qwen2VLModel.get_rope_index(rope_self, input_ids, torch.tensor([kinds]), torch.tensor(grids))
        else:
            position_ids = torch.arange(len(ids))[None, None].expand(3, 1, -1)
        with torch.inference_mode():
            out = oracle(inputs_embeds=torch.cat(embeds)[None].float(), position_ids=position_ids,
                         attention_mask=torch.ones_like(input_ids), use_cache=False)
        return Segments(tuple(parts)), out.last_hidden_state[0, -1].double().numpy()

    return make


DOC = "**Document**:\n<|vision_start|>"
QUERY = "<|vision_end|>\n**Query**:\nwhat does the chart show?"
PROMPTS = [
    (DOC, (2, 3), QUERY),  # a wide image document
    (DOC, (4, 1), QUERY),  # a tall one: the text after it continues at +max(nx, ny)
    (DOC, (1, 1), QUERY),
    ("**Document**:\nsome text about charts\n**Query**:\n<|vision_start|>", (3, 3), "<|vision_end|>"),  # an image query
    (DOC, (2, 2), "<|vision_end|>\n**Query**:\n<|vision_start|>", (3, 2), "<|vision_end|>"),  # image and image
    ("**Document**:\nonly text here\n**Query**:\nand a text query",),
]


@pytest.mark.parametrize("fast", [False, True], ids=["embedding-mode", "fast"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["packed", "deterministic"])
def test_image_rows_at_mrope_positions_equal_transformers(tiny_ggufs, pieces, fast, deterministic):
    seqs, want = zip(*(pieces(*p) for p in PROMPTS))
    path = with_identity_output(tiny_ggufs["f32"], "f32") if fast else tiny_ggufs["f32"]
    with Backbone(path, n_ctx=1024, n_batch=512, fast=fast, deterministic=deterministic) as b:
        got = b.embed(list(seqs))
    assert_hidden_close(got, np.stack(want), "f32", "prompts with image rows vs transformers")


def test_long_prompt_fed_in_pieces_across_an_image(tiny_ggufs, pieces):
    """n_batch smaller than the image: its rows are split over decodes, at the right positions."""
    seq, want = pieces(DOC, (5, 6), QUERY)
    with Backbone(tiny_ggufs["f32"], n_ctx=1024, n_batch=16) as b:
        got = b.embed([seq, seq.parts[0] + seq.parts[2] + seq.parts[3]])  # beside a text-only prompt
    assert_hidden_close(got[:1], want[None], "f32", "an image fed in 16-row pieces")


def test_an_image_longer_than_n_batch_is_fed_in_equal_pieces(tiny_ggufs, pieces):
    """540 image rows at n_batch 512 go in as 270 + 270, not 512 + 28: a piece under 64 rows takes llama.cpp's
    CPU attention for few query rows, which rounds the queries to F16 (as a long text prompt's chunks do)."""
    seq, want = pieces(DOC, (20, 27), QUERY)
    states = {}
    for n_batch in (512, 270):
        with Backbone(tiny_ggufs["f16"], n_ctx=1024, n_batch=n_batch, n_gpu_layers=0) as b:
            states[n_batch] = b.embed([seq])
    np.testing.assert_array_equal(states[512], states[270])  # the same two pieces of 270, so the same bits
    assert_hidden_close(states[512], want[None], "f16", "an image of 540 rows at n_batch 512")


def test_bad_image_rows_are_refused(tiny_ggufs):
    with Backbone(tiny_ggufs["f32"], n_ctx=256, n_batch=64) as b:
        wide = Embeddings(np.zeros((4, b.n_embd + 1), np.float32), nx=2, ny=2)
        with pytest.raises(RerankerError, match="width"):
            b.embed([Segments(([1, 2], wide, [100]))])
        nan = Embeddings(np.full((4, b.n_embd), np.nan, np.float32), nx=2, ny=2)
        with pytest.raises(RerankerError, match="non-finite"):
            b.embed([Segments(([1, 2], nan, [100]))])
    with pytest.raises(RerankerError, match="do not fill a 2 x 3 grid"):
        Embeddings(np.zeros((5, 8), np.float32), nx=3, ny=2)
    with pytest.raises(RerankerError, match="must end with a token"):
        Segments(([1], Embeddings(np.zeros((1, 8), np.float32), nx=1, ny=1)))


def flat_ids(prompt: Segments) -> list[int]:
    """The prompt's ids with each image's rows as that many `<|image_pad|>` ids, as the original's processor expands it."""
    pad = 151655
    return [t for p in prompt.parts for t in ([pad] * len(p.rows) if isinstance(p, Embeddings) else p)]


@pytest.fixture(scope="module")
def builder(tokenizer):
    from reranker.engine.prompts import PromptBuilder

    return lambda **limits: PromptBuilder(tokenizer, **limits)


def image(ny, nx):
    return Embeddings(np.zeros((ny * nx, 8), np.float32), nx=nx, ny=ny)


@pytest.mark.parametrize("query, doc", [("what does it show?  ", image(2, 3)), (image(3, 1), "a text document\n"),
                                        (image(2, 2), image(1, 3)), ("", image(1, 1)), (image(1, 1), "")])
def test_image_prompts_are_the_originals_template(tiny_checkpoint, builder, query, doc):
    """The original's processor: `<|image_pad|>` expanded to one per merged patch, the whole text tokenised at once."""
    tok = template_tokenizer(tiny_checkpoint)
    side = lambda x: f"<|vision_start|>{IMAGE_PAD * len(x.rows)}<|vision_end|>" if isinstance(x, Embeddings) else x  # noqa: E731
    want = tok.encode(f"**Document**:\n{side(doc)}\n**Query**:\n{side(query)}", add_special_tokens=False).ids + [SCORE_TOKEN_ID]
    prompt = builder().build_parts(query, doc)
    assert flat_ids(prompt.ids) == want and not prompt.truncated


def test_the_text_side_is_cut_never_the_image(builder):
    long = " ".join(f"word{i}" for i in range(100))  # under max_query_length (512 tokens)
    doc = image(4, 5)
    full = builder().build_parts(long, doc)
    assert not full.truncated
    cut = builder(max_length=60).build_parts(long, doc)  # the query is cut to fit; the image keeps its 20 rows
    assert cut.truncated and len(cut.ids) <= 60 and any(p is doc for p in cut.ids.parts)
    short_query = builder(max_query_length=5).build_parts(long, doc)
    assert short_query.truncated and len(short_query.ids) < len(full.ids)
    text_doc = builder(max_length=60).build_parts(image(2, 2), long)  # an image query: the document is cut
    assert text_doc.truncated and len(text_doc.ids) <= 60
    with pytest.raises(RerankerError, match=r"an image of 4 x 5 merged patches \(20 tokens\) does not fit max_length=20"):
        builder(max_length=20, max_query_length=10).build_parts("q", doc)
    named = PendingImage(None, nx=5, ny=4, name="documents[1] image")  # a loaded image says whose it is
    with pytest.raises(RerankerError, match=r"^documents\[1\] image of 4 x 5 merged patches \(20 tokens\) does not fit"):
        builder(max_length=20, max_query_length=10).build_parts("q", named)


def test_image_pairs_score_through_the_one_path(tiny_checkpoint, tiny_reranker, pieces):
    """`prepare` + `score_prepared` (what every caller runs) on pairs with image sides: the head on transformers' states."""
    from oracle import head_scores, score_head

    from reranker.engine.scoring import prepare, score_prepared

    query = "what does the chart show?"
    made = [pieces(DOC, (2, 3), QUERY), pieces(DOC, (4, 1), QUERY), pieces(PROMPTS[3][0], (3, 3), PROMPTS[3][2])]
    pairs = [(query, made[0][0].parts[1]), (query, made[1][0].parts[1]),
             (made[2][0].parts[1], "some text about charts"), ("a plain text pair", "scored beside them")]
    prepared = prepare(tiny_reranker.prompt_builder(), pairs)
    for prompt, (seq, _) in zip(prepared.prompts, made):
        assert flat_ids(prompt.ids) == flat_ids(seq)
    got = score_prepared(tiny_reranker, prepared, keep_hidden=True)
    want_hidden = np.stack([h for _, h in made])
    assert_hidden_close(got.hidden[:3], want_hidden, "f32", "image pairs' states")
    from oracle import assert_scores_close

    assert_scores_close(got.scores[:3], head_scores(score_head(tiny_checkpoint), want_hidden), "f32", "image pairs' scores")
    assert got.usage.tokens == sum(len(p.ids) for p in prepared.prompts)


def test_pending_images_take_their_grid_and_are_replaced_by_their_encoding():
    """A prompt built from an image's pixels (`PendingImage`) has the length and positions of its encoding,
    and `encoded` swaps in the projector's rows only when they fill the same grid."""
    from reranker.engine.segments import PendingImage

    pending = PendingImage(pixels=None, nx=3, ny=2, name="doc 0 image")
    rows = Embeddings(np.ones((6, 4), dtype=np.float32), nx=3, ny=2)
    seg = Segments(([1, 2], pending, [3, 100]))
    assert seg.pending and len(seg) == 10 and seg.starts() == [0, 2, 5]
    done = seg.encoded(lambda p: rows)
    assert not done.pending and done.parts[1] is rows and len(done) == len(seg) and done.starts() == seg.starts()
    with pytest.raises(RerankerError, match="doc 0 image was sized as 2 x 3 merged patches but encoded as 3 x 2"):
        seg.encoded(lambda p: Embeddings(np.ones((6, 4), dtype=np.float32), nx=2, ny=3))
