"""Image pairs through the API, against the original's computation in transformers.

The reference is transformers' Qwen2-VL with the whole synthetic checkpoint (vision tower included), fed as
the original `JinaVLForRanking.compute_score` feeds it: the image through the checkpoint's own image processor
(smart_resize within 3136..602112 pixels), `<|image_pad|>` expanded to one per merged patch in the template,
the last token's final-norm state through the checkpoint's score MLP in float64 (tests/oracle.py). Ours: the
F32 GGUF and an F32 mmproj from `reranker convert`, images loaded and resized by `reranker.images`, encoded in
libmtmd, decoded at M-RoPE positions by llama.cpp.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from helpers import picture
from oracle import SCORE_TOKEN_ID, head_scores, score_head
from PIL import Image
from tokenizers import Tokenizer

from reranker import Reranker, RerankerError

QUERY = "a chart of the quarterly sales"
# Measured (tiny checkpoint, F32 GGUF + F32 mmproj, 2-core AVX2): up to SCORE_ERR below. The vision tower's own
# error against transformers is ~6e-4 relative (llama.cpp rounds pixels and patch weights to F16 in its conv
# and uses F16 GELU tables; tests/images/test_encode.py); random weights amplify it. The bound: 2e-3.
SCORE_TOL = 2e-3


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoint, tiny_vision_gguf):
    """(Reranker on the F32 GGUF with an F32 mmproj beside it, the transformers reference: image -> score)."""
    from oracle import image_processor, load_vl_model

    gguf = tiny_vision_gguf
    rr = Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=2048, n_batch=1024)
    vl = load_vl_model(tiny_checkpoint)
    proc = image_processor(tiny_checkpoint)
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))  # the template's special tokens parsed
    head = score_head(tiny_checkpoint)

    @torch.inference_mode()
    def reference(query, doc) -> float:
        pixel_values, grids, sides = [], [], []
        for side in (doc, query):  # the processor gets the document's image first (prompt order)
            if isinstance(side, Image.Image):
                x = proc(images=[side.convert("RGB")], return_tensors="pt")
                pixel_values.append(x["pixel_values"])
                grids.append(x["image_grid_thw"])
                sides.append("<|vision_start|>" + "<|image_pad|>" * (int(x["image_grid_thw"].prod()) // 4) + "<|vision_end|>")
            else:
                sides.append(side)
        ids = tok.encode(f"**Document**:\n{sides[0]}\n**Query**:\n{sides[1]}", add_special_tokens=False).ids + [SCORE_TOKEN_ID]
        input_ids = torch.tensor([ids])
        mm = (input_ids == tok.token_to_id("<|image_pad|>")).int()  # what the processor returns beside the ids
        out = vl(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=torch.cat(pixel_values), mm_token_type_ids=mm,
                 image_grid_thw=torch.cat(grids), output_hidden_states=True, use_cache=False)
        return float(head_scores(head, out.hidden_states[-1][0, -1].double().numpy()[None])[0])

    yield rr, reference, gguf
    rr.close()


IMAGES = {
    "small": lambda: picture(40, 30, 0),  # below min_pixels: scaled up
    "wide": lambda: picture(300, 60, 1),
    "tall": lambda: picture(56, 200, 2),
    "rgba": lambda: picture(90, 90, 3, "RGBA"),
    "grey": lambda: picture(120, 80, 4, "L"),
}


def test_image_documents_equal_the_original(vision_model):
    rr, reference, _ = vision_model
    images = [make() for make in IMAGES.values()]
    got = rr.compute_score([[QUERY, im] for im in images], doc_type="image")
    want = [reference(QUERY, im) for im in images]
    diff = np.abs(np.array(got) - np.array(want))
    print(f"image documents: |score difference| per image {diff}")
    assert diff.max() < SCORE_TOL, diff


def test_image_queries_and_image_pairs_equal_the_original(vision_model):
    rr, reference, _ = vision_model
    a, b = IMAGES["wide"](), IMAGES["tall"]()
    got = rr.compute_score([[a, "a text document about sales"]], query_type="image")
    assert got == pytest.approx([reference(a, "a text document about sales")], abs=SCORE_TOL)
    both = rr.compute_score([b, a], doc_type="image", query_type="image")  # one pair: a float
    assert both == pytest.approx(reference(b, a), abs=SCORE_TOL)


def test_an_image_query_chunks_a_long_text_document(vision_model):
    # chunking=True was ignored for an image query (the document truncated, silently): its chunks now follow the image.
    from reranker import Chunking
    from reranker.engine.chunking import Chunker
    from reranker.engine.vision import load
    from reranker.options import ImageRef

    rr, reference, _ = vision_model
    im = IMAGES["wide"]()
    doc = " ".join(f"sales figure {i}" for i in range(900))
    chunking = Chunking(size=300, overlap=30)
    got = {r["corpus_id"]: r for r in rr.rank(im, [doc, "a short document"], query_type="image", chunking=chunking)}
    assert got[0]["chunks"] > 1 and got[1]["chunks"] == 1 and rr.last_usage.chunked == 1
    texts = Chunker(rr.prompt_builder(), chunking).chunk_texts(load(ImageRef(im, "query"), rr.vision.sizing), doc)
    assert len(texts) == got[0]["chunks"] and all(t in doc for t in texts)
    alone = rr.compute_score([[im, t] for t in texts], query_type="image")
    assert got[0]["score"] == pytest.approx(max(alone), abs=1e-5)
    assert alone[0] == pytest.approx(reference(im, texts[0]), abs=SCORE_TOL)  # a chunk's prompt is the original's


def test_every_input_kind_and_mixed_documents(vision_model, tmp_path):
    rr, _, _ = vision_model
    im = IMAGES["wide"]()
    png = tmp_path / "doc.png"
    im.save(png)
    data = png.read_bytes()
    import base64

    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    kinds = [im, png, str(png), data, uri]
    scores = rr.compute_score([[QUERY, k] for k in kinds], doc_type="image")
    # the same pixels, whatever the container (packed beside each other: the last bit may differ)
    assert scores == pytest.approx([scores[0]] * len(kinds), abs=1e-6)
    ranked = rr.rank(QUERY, [{"image": png}, {"text": "plain text about sales"}, "another text"], return_documents=True)
    assert {r["corpus_id"] for r in ranked} == {0, 1, 2}
    by_id = {r["corpus_id"]: r for r in ranked}
    assert by_id[0]["score"] == pytest.approx(scores[0], abs=1e-6) and by_id[0]["image"] == png
    assert by_id[1]["text"] == "plain text about sales"
    assert by_id[2]["score"] == pytest.approx(rr.compute_score([QUERY, "another text"]), abs=1e-6)
    images_ranked = rr.rank(QUERY, [png, io.BytesIO(data).getvalue()], doc_type="image")
    assert [r["score"] for r in images_ranked] == pytest.approx([scores[0]] * 2, abs=1e-6)


def test_bad_images_are_named(vision_model, tmp_path):
    rr, _, _ = vision_model
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(RerankerError, match=r"pair 1: the document image .*notes\.txt"):
        rr.compute_score([[QUERY, picture(40, 40, 0)], [QUERY, str(tmp_path / "notes.txt")]], doc_type="image")
    with pytest.raises(RerankerError, match="URL|http"):
        rr.compute_score([QUERY, "https://example.com/a.png"], doc_type="image")
    with pytest.raises(RerankerError, match=r"doc_type='picture' must be"):
        rr.compute_score([QUERY, "x"], doc_type="picture")
    with pytest.raises(RerankerError, match=r"pair 0: the document must be .*\"image\""):
        rr.compute_score([[QUERY, {"picture": "x"}]])


def test_text_only_never_loads_the_projector_and_a_missing_one_is_named(vision_model, tmp_path):
    _, _, gguf = vision_model
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(gguf, alone / gguf.name)
    shutil.copy(gguf.parent / "mlp_weights.npz", alone / "mlp_weights.npz")
    with Reranker.from_pretrained(str(alone / gguf.name), device="cpu", n_ctx=512) as rr:
        rr.compute_score([QUERY, "text"])
        assert rr._vision is None
        with pytest.raises(RerankerError, match=r"no mmproj-\*\.gguf beside .*pass mmproj="):
            rr.compute_score([QUERY, picture(40, 40, 0)], doc_type="image")
    mmproj = next(gguf.parent.glob("mmproj-*.gguf"))
    with Reranker.from_pretrained(str(alone / gguf.name), device="cpu", n_ctx=512, mmproj=str(mmproj)) as rr:
        assert 0 < rr.compute_score([QUERY, picture(40, 40, 0)], doc_type="image") < 1


def test_rerank_command_takes_images(vision_model, tmp_path, capsys):
    import json

    from reranker.cli import main

    rr, _, gguf = vision_model
    png = tmp_path / "page.png"
    IMAGES["tall"]().save(png)
    base = ["rerank", "-m", str(gguf), "--n-ctx", "2048", "--threads", "2", "--json"]
    assert main([*base, "-q", QUERY, "--image", str(png), "-d", "a text document"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_index = {r["index"]: r for r in out["results"]}
    assert by_index[1]["document"] == {"image": str(png)} and by_index[0]["document"] == {"text": "a text document"}
    assert by_index[1]["relevance_score"] == pytest.approx(rr.compute_score([QUERY, png], doc_type="image"), abs=1e-6)
    assert main([*base, "--image-query", str(png), "-d", "a text document"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["relevance_score"] == pytest.approx(
        rr.compute_score([png, "a text document"], query_type="image"), abs=1e-6)
    assert main([*base, "-q", QUERY, "--image-query", str(png), "-d", "x"]) == 2
    assert "one of the two" in capsys.readouterr().err


def jpeg_with_exif_rotation(img: Image.Image) -> bytes:
    """`img` stored sideways in a JPEG whose EXIF orientation (6: rotate 90 CW to view) brings it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_large_and_rotated_images_equal_the_original(vision_model):
    """Above max_pixels (scaled down to at most 768 merged patches), and an EXIF-rotated JPEG (both sides decode it with PIL)."""
    rr, reference, _ = vision_model
    large = picture(1100, 700, 5)  # 770,000 pixels > 602,112
    rotated = jpeg_with_exif_rotation(picture(120, 64, 6))
    got = rr.compute_score([[QUERY, large], [QUERY, rotated]], doc_type="image")
    want = [reference(QUERY, large), reference(QUERY, Image.open(io.BytesIO(rotated)).transpose(Image.Transpose.ROTATE_270))]
    assert np.abs(np.array(got) - np.array(want)).max() < SCORE_TOL, (got, want)
    assert rr.last_usage.tokens > 768  # the large image's patches are in the prompt


@pytest.mark.slow  # two more conversions and loads
def test_f16_and_q8_0_projectors_drift_within_bounds(vision_model, tiny_checkpoint, tmp_path):
    """Score drift of quantized projectors against the F32 one (same F32 backbone), on random weights."""
    from reranker.gguf.mmproj import convert_mmproj

    rr, _, gguf = vision_model
    images = [make() for make in IMAGES.values()]
    pairs = [[QUERY, im] for im in images]
    f32 = np.array(rr.compute_score(pairs, doc_type="image"))
    drift = {}
    for t in ("f16", "q8_0"):
        mmproj = convert_mmproj(tiny_checkpoint, tmp_path / t, t)
        with Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=2048, n_batch=1024, mmproj=str(mmproj)) as q:
            drift[t] = float(np.abs(np.array(q.compute_score(pairs, doc_type="image")) - f32).max())
    print(f"projector score drift against F32: {drift}")
    assert drift["f16"] < 2e-3 and drift["q8_0"] < 2e-2, drift


def test_deterministic_mode_and_hidden_states_with_images(vision_model, tiny_checkpoint):
    """Deterministic: an image pair's score is bit-identical alone and in any batch; `embed` gives the states scored."""
    _, _, gguf = vision_model
    images = [make() for make in IMAGES.values()]
    pairs = [[QUERY, {"image": im}] for im in images] + [[QUERY, {"text": "a text document about sales"}]]
    with Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=2048, n_batch=1024, deterministic=True) as rr:
        batch = rr.compute_score(pairs)
        alone = [rr.compute_score(p) for p in pairs]
        assert batch == alone  # bit for bit
        reordered = rr.compute_score(pairs[::-1], batch_size=2)
        assert reordered[::-1] == batch
        hidden = rr.embed(pairs)
        assert hidden.shape == (len(pairs), 64)
        assert rr.score_embeddings(hidden).tolist() == pytest.approx(batch, abs=0)


def test_loading_the_projector_warns_nothing(vision_model, caplog):
    """libmtmd's Qwen-VL grounding advice (1024 image tokens at least) does not apply to reranking: not a warning."""
    import logging

    _, _, gguf = vision_model
    with caplog.at_level(logging.DEBUG, logger="reranker.llama"), \
            Reranker.from_pretrained(str(gguf), device="cpu", n_ctx=1024) as rr:
        rr.compute_score([QUERY, picture(40, 40, 0)], doc_type="image")
    advice = [r for r in caplog.records if "1024 image tokens" in r.getMessage()]
    assert advice and all(r.levelno == logging.DEBUG for r in advice)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "reranker.llama"]
