"""`reranker embed` writes llama-embedding's output; `reranker head` on it reproduces `compute_score`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reranker import format_prompt
from reranker.cli import main as cli_main
from reranker.compat.embed import format_embeddings, process_escapes, split_prompts

SEP = "<#sep#>"
PAIRS = [
    ["what is a reranker?", "A reranker scores how relevant a document is to a query."],
    ["python sort a dict", "def f(d):\n    return dict(sorted(d.items(), key=lambda kv: kv[1]))\n"],
    ["multi-line", "First line.\n\nSecond paragraph,\r\n  indented\tand tabbed.\n"],
    ["机器学习是什么", "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。"],
    ["special <|box_end|>", "text with <|box_end|> and <|endoftext|> inside"],
    ["a query for an empty document", ""],
]


def _llama_embedding_json(emb: np.ndarray) -> str:
    """What llama-embedding's embedding.cpp prints for --embd-output-format json: its printf loop, transcribed from
    the llama.cpp that llama-cpp-python 0.3.36 vendors (the binary is not built here: README, llama-embedding compatibility)."""
    out = '{\n  "object": "list",\n  "data": [\n'
    for j, row in enumerate(emb):
        out += '    {\n      "object": "embedding",\n      "index": %d,\n      "embedding": ' % j
        out += "[" + ",".join("%1.7f" % v for v in row) + "]\n    }"
        out += ",\n" if j + 1 < len(emb) else ""
    return out + "\n  ]" + "\n}\n" + "\n"


@pytest.fixture(scope="module")
def gguf(tiny_ggufs):
    return str(tiny_ggufs["f32"])


@pytest.fixture(scope="module")
def head_npz(tiny_ggufs):
    return str(tiny_ggufs["f32"].parent / "mlp_weights.npz")


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    # As the release's test.txt: `<|box_end|><#sep#>` between prompts, a newline at the end.
    path = tmp_path_factory.mktemp("compat") / "test.txt"
    text = SEP.join(format_prompt(q, d) + "<|box_end|>" for q, d in PAIRS) + "\n"
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def out_json(gguf, batch_file):
    out = batch_file.parent / "out.json"
    rc = cli_main(["embed", "-m", gguf, "-f", str(batch_file), "--embd-separator", SEP, "--embd-output-format", "json",
                            "--pooling", "last", "--embd-normalize", "-1", "-c", "4096", "-b", "1024", "-o", str(out)])
    assert rc == 0
    return out


def test_embed_json_is_llama_embeddings_layout_and_values(out_json, tiny_reranker):
    text = out_json.read_text(encoding="utf-8")
    data = json.loads(text)
    assert list(data) == ["object", "data"] and data["object"] == "list" and len(data["data"]) == len(PAIRS)
    for i, item in enumerate(data["data"]):
        assert list(item) == ["object", "index", "embedding"] and item["object"] == "embedding" and item["index"] == i
        assert len(item["embedding"]) == tiny_reranker.backbone.n_embd
    got = np.array([item["embedding"] for item in data["data"]])
    want = tiny_reranker.embed(PAIRS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Byte for byte what embedding.cpp's printf loop (transcribed) prints for the same numbers.
    assert text == _llama_embedding_json(got.astype(np.float32))


def test_head_on_llama_json_and_npy_reproduces_compute_score(gguf, batch_file, out_json, head_npz, tiny_reranker, tmp_path,
                                                               capsys):
    want = np.array(tiny_reranker.compute_score(PAIRS))
    assert cli_main(["head", str(out_json), "--head", head_npz, "--device", "cpu"]) == 0
    txt = np.array([float(x) for x in capsys.readouterr().out.split()])
    np.testing.assert_allclose(txt, want, rtol=0, atol=1e-6)

    emb = tmp_path / "emb.npy"
    assert cli_main(["embed", "-m", gguf, "-f", str(batch_file), "--embd-separator", SEP,
                              "-c", "4096", "-o", str(emb)]) == 0  # format inferred from the suffix
    np.testing.assert_allclose(np.load(emb), tiny_reranker.embed(PAIRS), rtol=0, atol=1e-6)
    scores = tmp_path / "scores.json"
    assert cli_main(["head", str(emb), "--head", head_npz, "--device", "cpu", "-o", str(scores), "--batch-size", "4"]) == 0
    np.testing.assert_allclose(json.loads(scores.read_text()), want, rtol=0, atol=1e-6)
    npy_scores = tmp_path / "scores.npy"
    assert cli_main(["head", str(out_json), "--head", head_npz, "--device", "cpu", "-o", str(npy_scores),
                             "--batch-size", "2"]) == 0  # several JSON chunks
    got = np.load(npy_scores)
    assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_array_and_raw_formats_and_single_prompt(gguf, head_npz, tiny_reranker, capsys, tmp_path):
    q, d = PAIRS[0]
    # -p with escapes, as in the release's recipe: `\n` in the shell string is a newline.
    prompt = format_prompt(q, d).replace("\n", "\\n") + "<|box_end|>"
    assert cli_main(["embed", "-m", gguf, "-p", prompt, "--embd-separator", SEP, "--embd-output-format", "array", "-c", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[[") and out.endswith("]]\n\n")
    np.testing.assert_allclose(json.loads(out), tiny_reranker.embed([[q, d]]), rtol=0, atol=1e-6)
    # Array output is scored too.
    arr = tmp_path / "arr.json"
    arr.write_text(out)
    assert cli_main(["head", str(arr), "--head", head_npz, "--device", "cpu", "--format", "json"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out), [tiny_reranker.compute_score([q, d])], atol=1e-6)

    # llama.cpp decodes escapes in every prompt (-f too); --no-escape keeps backslashes as text.
    path = r"C:\new\table"
    windows = format_prompt(q, path) + "<|box_end|>"
    assert cli_main(["embed", "-m", gguf, "-p", windows, "--embd-separator", SEP, "--embd-output-format", "raw",
                              "-c", "4096"]) == 0
    raw = np.array(capsys.readouterr().out.split(), dtype=float)
    np.testing.assert_allclose(raw, tiny_reranker.embed([[q, "C:\new\table"]])[0], rtol=0, atol=1e-6)
    assert cli_main(["embed", "-m", gguf, "-p", windows, "--embd-separator", SEP, "--no-escape",
                              "--embd-output-format", "raw", "-c", "4096"]) == 0
    raw = np.array(capsys.readouterr().out.split(), dtype=float)
    np.testing.assert_allclose(raw, tiny_reranker.embed([[q, path]])[0], rtol=0, atol=1e-6)


def test_prompt_splitting_and_escapes():
    assert split_prompts(b"a<|box_end|><#sep#>b<|box_end|><#sep#>", SEP) == ["a<|box_end|>", "b<|box_end|>"]
    assert split_prompts(b"a\nb", "\n") == ["a", "b"]
    assert process_escapes(rb"x\ny\t\\n\q\x41\x4") == b"x\ny\t\\n\\qA\\x4"
    assert "".join(format_embeddings([np.array([[1.0, -2.5e-9]], np.float32)], "raw")) == "1.0000000 -0.0000000\n\n"


@pytest.mark.parametrize("args, needle", [
    (["--pooling", "mean"], "only --pooling last"),
    (["--embd-normalize", "2"], "--embd-normalize -1"),
    (["--embd-output-format", "npy"], "-o FILE.npy"),
])
def test_embed_option_errors(gguf, batch_file, capsys, args, needle):
    assert cli_main(["embed", "-m", gguf, "-f", str(batch_file), "--embd-separator", SEP, *args]) == 2
    assert needle in capsys.readouterr().err


def test_embed_prompt_errors(gguf, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(SEP.join([format_prompt("q", "d") + "<|box_end|>", format_prompt("q", "no score token")]))
    assert cli_main(["embed", "-m", gguf, "-f", str(bad), "--embd-separator", SEP]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 does not end with <|box_end|>" in err and "--embd-separator '<#sep#>'" in err
    # The default separator splits multi-line prompts: the error says so before loading the model.
    assert cli_main(["embed", "-m", "/nonexistent.gguf", "-f", str(bad)]) == 2
    assert "prompt 0 does not end with <|box_end|>" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text(format_prompt("q", "word " * 400) + "<|box_end|>")
    out = tmp_path / "never.json"
    assert cli_main(["embed", "-m", gguf, "-f", str(long), "--embd-separator", SEP, "-c", "128", "-o", str(out)]) == 2
    assert "prompt 0 has" in capsys.readouterr().err and not out.exists()


def test_head_errors(out_json, head_npz, tmp_path, capsys, tiny_reranker):
    hidden = tiny_reranker.backbone.n_embd
    wrong = tmp_path / "wrong_head.npz"
    h = hidden * 2
    np.savez(wrong, W1=np.zeros((h, h), np.float32), b1=np.zeros(h, np.float32), W2=np.zeros((h, 1), np.float32),
             b2=np.zeros(1, np.float32), logit_bias=np.array([2.65], np.float32))
    assert cli_main(["head", str(out_json), "--head", str(wrong), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"embeddings of size {hidden}" in err and f"takes {h}" in err and str(out_json) in err and "mlp_weights.npz" in err

    data = json.loads(out_json.read_text())
    data["data"][1]["index"], data["data"][2]["index"] = 2, 1
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(data))
    out = tmp_path / "scores.txt"
    assert cli_main(["head", str(shuffled), "--head", head_npz, "--device", "cpu", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data entry 1 has index 2" in err and "sort" in err and not out.exists()

    truncated = tmp_path / "truncated.json"
    truncated.write_text(out_json.read_text()[:-40])
    assert cli_main(["head", str(truncated), "--head", head_npz, "--device", "cpu"]) == 2
    assert "invalid or truncated JSON" in capsys.readouterr().err

    npy = tmp_path / "wrong.npy"
    np.save(npy, np.zeros((3, hidden + 1), np.float32))
    assert cli_main(["head", str(npy), "--head", head_npz, "--device", "cpu"]) == 2
    assert f"embeddings of size {hidden + 1}" in capsys.readouterr().err


def test_head_output_through_links_fifos_and_closed_streams(out_json, head_npz, tmp_path, capsys, monkeypatch):
    import os
    import sys
    import threading

    args = ["head", str(out_json), "--head", head_npz, "--device", "cpu"]
    assert cli_main(args) == 0
    expected = capsys.readouterr().out
    # A symbolic link is written through: the file it names gets the scores, the link stays a link.
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    assert cli_main([*args, "-o", str(link)]) == 0
    assert link.is_symlink() and target.read_text() == expected
    # A fifo is written to, not replaced by a regular file (its reader used to wait for ever).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert cli_main([*args, "-o", str(fifo)]) == 0
    reader.join(30)
    assert got == [expected] and fifo.is_fifo()
    assert cli_main([*args, "-o", str(fifo), "--format", "npy"]) == 2  # a file written in place cannot be a fifo
    assert "is not a regular file" in capsys.readouterr().err and fifo.is_fifo()
    # Closed standard streams are one line each, not an AttributeError from deep inside.
    monkeypatch.setattr(sys, "stdin", None)
    assert cli_main(["head", "-", "--head", head_npz, "--device", "cpu"]) == 2
    assert "standard input is closed" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdout", None)
    assert cli_main(args) == 2
    assert "standard output is closed" in capsys.readouterr().err


def test_head_device_that_cannot_run_it_is_named(out_json, head_npz, capsys):
    assert cli_main(["head", str(out_json), "--head", head_npz, "--device", "meta"]) == 2
    assert "device 'meta' cannot run the head here" in capsys.readouterr().err


def test_invalid_utf8_is_blamed_on_the_file_or_on_an_escape():
    from reranker import RerankerError

    with pytest.raises(RerankerError, match=r"p\.txt is not valid UTF-8 at byte 2; re-encode it as UTF-8$"):
        split_prompts(b"ok\xff", source="p.txt")  # the file's own byte: no escape to blame, --no-escape would not help
    with pytest.raises(RerankerError, match=r"p\.txt: a \\xHH escape makes invalid UTF-8 .* --no-escape"):
        split_prompts(b"ok\\xff", source="p.txt")
    assert split_prompts(b"ok\\xff", escape=False) == ["ok\\xff"]
