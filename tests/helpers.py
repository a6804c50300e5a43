"""Plain helpers the test modules share (fixtures are in conftest.py): input files, `reranker score` command lines, GGUFs."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np

WORDS = "alpha beta gamma delta 机器 学习 🎉 code() x=1 résumé".split()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def write_nested(path: Path, n_queries=40, seed=0, words=WORDS, max_words=40, max_docs=8) -> None:
    """`n_queries` nested records of random words: 1 to `max_docs` documents of 1 to `max_words` words each."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for q in range(n_queries):
            docs = [" ".join(rng.choices(words, k=rng.randint(1, max_words))) for _ in range(rng.randint(1, max_docs))]
            f.write(json.dumps({"query_id": f"q{q}", "query": " ".join(rng.choices(words, k=3)), "documents": docs},
                               ensure_ascii=False) + "\n")


def score_args(model, inp, out, *extra, n_ctx=1024, window=4) -> list[str]:
    """`reranker score` arguments for a small quiet job; `extra` come last, so they override."""
    return ["score", "-m", str(model), "-i", str(inp), "-o", str(out), "--n-ctx", str(n_ctx), "--window", str(window),
            "--quiet", *map(str, extra)]


def score_cmd(model, inp, out, *extra) -> list[str]:
    """`score_args` (16 records a window) as a `python -m reranker` command line."""
    return [sys.executable, "-m", "reranker", *score_args(model, inp, out, *extra, window=16)]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@contextlib.contextmanager
def process_logging():
    """The root logger as a fresh process has it (no handlers), so that `reranker.cli.main`'s `logging.basicConfig`
    writes its log lines to the current stderr as in a process of its own, not to pytest's log capture; restored after."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run_here(cmd) -> int:
    """`cmd`, a `python -m reranker` command line (`score_cmd`), run by `reranker.cli.main` in this process: its exit status.

    For the runs of a kill test that nothing kills (the clean run, the resume): the job's bytes do not depend on the
    process it runs in, and a process of its own costs seconds of start-up (Python, torch) that the suite pays many times."""
    from reranker.cli import main

    if list(map(str, cmd[:3])) != [sys.executable, "-m", "reranker"]:
        raise ValueError(f"not a `python -m reranker` command line: {cmd[:3]}")
    return main([str(a) for a in cmd[3:]])


def consumed(out: Path) -> int:
    """How many input records the job writing `out` has checkpointed (-1: no checkpoint yet)."""
    try:
        return json.loads(out.with_name(out.name + ".checkpoint.json").read_text())["consumed"]
    except (OSError, ValueError, KeyError):
        return -1


def kill_when(cmd, out: Path, after_consumed: int, delay: float) -> int:
    """Start the job, wait until its checkpoint passes `after_consumed`, wait `delay`, SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while consumed(out) <= after_consumed and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def write_gguf(path: Path, kv: dict, tensors: dict[str, np.ndarray], arch: str = "qwen2vl", alignment: int | None = None) -> Path:
    """A GGUF written by gguf-py (the reference writer), its entries in `kv`'s order.

    A value's GGUF type follows its Python type (an int is UINT32, as GGUF's counts and ids are);
    `(value, gguf.GGUFValueType.X)` gives another. `alignment`: the data's (gguf-py takes it from
    its attribute, not from a `general.alignment` entry, which `kv` must then hold too).
    """
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.data_alignment = alignment
    for key, value in kv.items():
        if isinstance(value, tuple):
            value, vtype = value
        else:
            vtype = gguf.GGUFValueType.UINT32 if type(value) is int else gguf.GGUFValueType.get_type(value)
        w.add_key_value(key, value, vtype)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_py_identity_copy(src, dst, dtype: str, reencode: bool) -> None:
    """The fast path's identity copy as gguf-py makes it: every entry decoded by GGUFReader and re-encoded by
    GGUFWriter (the reference for reranker/gguf/layout.py's byte copy, and benchmarks/fast_path_copy.py's baseline)."""
    from reranker.engine.identity import BF16_TENSORS_KEY, CONTENT_KEY, MARKER_KEY, REENCODE_KEY, SOURCE_KEY, bf16_exact, to_bf16

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tensors = [t for t in reader.tensors if t.name != "output.weight"]
    f16 = [t for t in tensors if t.tensor_type == gguf.GGMLQuantizationType.F16]
    as_bf16 = {t.name for t in f16 if bf16_exact(t.data)} if reencode else set()
    reencode = reencode and bool(as_bf16)  # nothing exact: the plain copy, which it would equal but for its markers
    writer = gguf.GGUFWriter(str(dst), arch)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    writer.add_key_value(MARKER_KEY, dtype, gguf.GGUFValueType.STRING)
    writer.add_key_value(SOURCE_KEY, str(src.resolve()), gguf.GGUFValueType.STRING)
    writer.add_key_value(CONTENT_KEY, hashlib.sha256(Path(src).read_bytes()).hexdigest(), gguf.GGUFValueType.STRING)
    if reencode:
        writer.add_key_value(REENCODE_KEY, "bf16", gguf.GGUFValueType.STRING)
        writer.add_key_value(BF16_TENSORS_KEY, len(as_bf16), gguf.GGUFValueType.UINT32)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == "general.file_type" and f16 and len(as_bf16) == len(f16):
            value = int(gguf.LlamaFileType.MOSTLY_BF16)
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in tensors:
        if t.name in as_bf16:
            writer.add_tensor_info(t.name, t.data.shape, np.dtype(np.uint16), t.data.nbytes, gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    eye = np.zeros((n_vocab, n_embd), dtype={"f16": np.float16, "f32": np.float32}[dtype])
    eye[np.arange(n_embd), np.arange(n_embd)] = 1
    writer.add_tensor_info("output.weight", eye.shape, eye.dtype, eye.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(to_bf16(t.data) if t.name in as_bf16 else t.data)
    writer.write_tensor_data(eye)
    writer.close()



# Linux's prctl(PR_CAPBSET_DROP) and the two capabilities that let root ignore file modes.
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def modes_hold() -> None:
    """A `preexec_fn`: the program it runs obeys file modes even as root.

    Root reads a chmod 000 file and writes into a chmod 555 folder through CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; dropped from the bounding set before exec, the program is root without them
    (CI runs as root, so a permission test must not depend on the user). A user process keeps its
    modes anyway, so nothing is dropped there.
    """
    if os.geteuid() != 0:
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed: root without CAP_SETPCAP "
                                              "cannot drop the capabilities that ignore file modes")


@contextlib.contextmanager
def running_server(reranker, settings=None, **config):
    """(base URL, app) of a uvicorn server on an ephemeral loopback port, in a thread; stopped on exit.

    `config`: more `uvicorn.Config` settings; the `uvicorn.Server` is `app.state.uvicorn`."""
    import uvicorn

    from reranker.serve.app import create_app
    from reranker.serve.settings import ServeSettings

    app = create_app(reranker, settings or ServeSettings())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    app.state.uvicorn = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def serve_process(gguf, log_path, *extra: str, env: dict[str, str] | None = None):
    """`reranker serve` in its own process on a free port: (process, base URL); `env`: variables to add."""
    import httpx

    from reranker.serve.settings import API_KEY_ENV

    cmd = [sys.executable, "-m", "reranker", "serve", "-m", str(gguf), "--port", "0", "--device", "cpu", "--n-ctx", "4096",
           "--n-batch", "1024", "--threads", "1", *extra]
    environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**environ, **(env or {})})
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"listening on (http://\S+)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
            time.sleep(0.05)
        url = m.group(1)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, f"the server is not healthy:\n{log_path.read_text()}"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def picture(w: int, h: int, seed: int, mode: str = "RGB"):
    """A `w` x `h` PIL image: gradients and seeded noise, so that images of other seeds score differently."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def png_bytes(img) -> bytes:
    """`img` as a PNG file's bytes."""
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --- PDF files: written by pypdfium2, or by hand (an encrypted one) -------------------------------------------

# Pages in PDF units (1/72 in): US letter, A4 landscape, a small square.
PDF_PAGES = [(612, 792), (842, 595), (200, 200)]


def page_picture(w: int, h: int, seed: int):
    """Smooth colour gradients (so resampling barely changes them) with a seeded tint per picture."""
    from PIL import Image

    tint = np.random.default_rng(seed).integers(0, 256, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    px = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.broadcast_to(tint[2], (h, w))], -1)
    return Image.fromarray(((px + tint) % 256).astype(np.uint8), "RGB")


def write_pdf(path, pages=PDF_PAGES) -> list:
    """A PDF whose page i is filled by picture i (stretched over the page); returns the pictures."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    pictures = []
    for i, (w, h) in enumerate(pages):
        pic = page_picture(96, 96 * h // w, seed=i)
        page = pdf.new_page(w, h)
        obj = pdfium.PdfImage.new(pdf)
        obj.set_bitmap(pdfium.PdfBitmap.from_pil(pic))
        obj.set_matrix(pdfium.PdfMatrix().scale(w, h))
        page.insert_obj(obj)
        page.gen_content()
        pictures.append(pic)
    pdf.save(str(path))
    pdf.close()
    return pictures


def hand_written_pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF file of these objects (1, 2, ...; object 1 the catalog) with its cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for b in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: str, owner_password: str) -> bytes:
    """One 300x200 page drawing a blue rectangle, encrypted (standard handler, revision 2, 40-bit RC4).

    An empty `user_password` is a file that opens without one (only the owner's restrictions apply)."""
    doc_id, perms = bytes(range(16)), -4
    padded = lambda pw: (pw.encode("latin-1") + _PAD)[:32]
    owner = rc4(hashlib.md5(padded(owner_password)).digest()[:5], padded(user_password))  # algorithm 3
    key = hashlib.md5(padded(user_password) + owner + struct.pack("<i", perms) + doc_id).digest()[:5]  # algorithm 2
    stream = rc4(hashlib.md5(key + (4).to_bytes(3, "little") + b"\0\0").digest()[:10], b"0 0 1 rg 50 50 200 100 re f")
    return hand_written_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (owner.hex().encode(), rc4(key, _PAD).hex().encode(), perms),
    ], b"/Encrypt 5 0 R /ID [<%s> <%s>]" % (doc_id.hex().encode(), doc_id.hex().encode()))


# --- vision: a tiny Qwen2-VL vision tower and llama.cpp's own converter ---------------------------------------

#: Qwen2-VL's preprocessor_config.json (Qwen/Qwen2-VL-2B-Instruct; jina-reranker-m0 ships the same values).
QWEN2VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
    "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255, "min_pixels": 3136, "max_pixels": 12845056,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}


def tiny_vision_config(text_hidden: int = 64) -> dict:
    """A Qwen2-VL vision tower small enough for tests. Depth 3: llama.cpp's converter maps the merger's
    `mlp.2` only for block indices below the depth, so a tower of 1 or 2 blocks cannot be converted."""
    return {"depth": 3, "embed_dim": 32, "hidden_size": text_hidden, "num_heads": 2, "mlp_ratio": 4, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"}


def tiny_vision_model(vision_config: dict, seed: int = 0):
    """transformers' Qwen2-VL vision tower (float32, eager attention, eval), seeded weights of unit gain.

    transformers' own init (std 0.02) makes the tower nearly constant, so weights are redrawn with
    std 1/sqrt(fan_in) (layer norms 1 +- 0.1): different images then give clearly different embeddings.
    """
    import torch
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLVisionConfig(**vision_config)
    cfg._attn_implementation = "eager"
    model = Qwen2VisionTransformerPretrainedModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # layer norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_tiny_vision_checkpoint(out: Path, text_hidden: int = 64, seed: int = 0) -> Path:
    """A Qwen2-VL checkpoint in the Hub layout with only its vision tower (`visual.*`), for llama.cpp's
    `convert_hf_to_gguf.py --mmproj`: config.json (Qwen2VLForConditionalGeneration, text hidden size
    `text_hidden`), model.safetensors, preprocessor_config.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    vc = tiny_vision_config(text_hidden)
    model = tiny_vision_model(vc, seed)
    save_file({"visual." + k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": text_hidden,
              "intermediate_size": 2 * text_hidden, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "vocab_size": 151936, "torch_dtype": "float32", "vision_config": vc}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(QWEN2VL_PREPROCESSOR, indent=1) + "\n", encoding="utf-8")
    return out


def load_tiny_vision(checkpoint: Path):
    """The vision tower saved by `write_tiny_vision_checkpoint`, loaded strictly into transformers."""
    from safetensors.torch import load_file

    vc = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["vision_config"]
    model = tiny_vision_model(vc, seed=0)
    sd = {k.removeprefix("visual."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True)
    return model


def llama_cpp_source(cache: Path) -> Path:
    """llama.cpp's source tree as vendored by the installed llama-cpp-python (its `convert_hf_to_gguf.py`,
    `conversion/` and `gguf-py/`), so tests can run llama.cpp's own converter as a reference.

    `RERANKER_LLAMA_CPP_SRC` names a checkout; otherwise the source package of the installed version is
    fetched once with `pip download --no-binary` (PyPI) and those files are kept under `cache`.
    """
    import importlib.metadata
    import shutil
    import tarfile
    import tempfile

    if os.environ.get("RERANKER_LLAMA_CPP_SRC"):
        return Path(os.environ["RERANKER_LLAMA_CPP_SRC"])
    version = importlib.metadata.version("llama-cpp-python")
    dest = cache / f"llama.cpp-{version}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                              "--no-binary", ":all:", "-d", tmp], capture_output=True, text=True,
                             timeout=600)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed: {res.stderr[-2000:]}")
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        staging = Path(tmp) / "src"
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/vendor/llama.cpp/", 1)
                if len(parts) == 2 and parts[1].startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = parts[1]
                    # the "data" filter (no links out, no special files) exists from 3.10.12 / 3.11.4 on
                    tar.extract(m, staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(dest)
        except OSError:  # another session got there first, or /tmp is another file system
            if not (dest / "convert_hf_to_gguf.py").is_file():
                shutil.copytree(staging, dest, dirs_exist_ok=True)
    return dest


def convert_mmproj(source: Path, checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's `convert_hf_to_gguf.py --mmproj` (offline) on `checkpoint`; returns the mmproj GGUF."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, as llama.cpp runs it
    res = run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--mmproj", "--outtype", outtype,
               "--outfile", str(out)], env=env, cwd=source)
    if res.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {checkpoint}:\n{res.stderr[-3000:]}")
    return out
