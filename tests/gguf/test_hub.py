"""Model references: local files and folders, `repo:QUANT` from a Hugging Face cache, offline errors."""

from __future__ import annotations

import shutil

import pytest

from reranker import Reranker, RerankerError
from reranker.gguf.hub import hub_patterns, mmproj_from_hub, resolve, split_ref

REPO = "jinaai/jina-reranker-m0-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hf_cache(tmp_path, tiny_ggufs):
    """A Hugging Face hub cache laid out as huggingface_hub writes it, holding two quant files."""
    repo_dir = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    shutil.copy(tiny_ggufs["f32"], snap / "jina-reranker-m0-F32.gguf")
    shutil.copy(tiny_ggufs["f16"], snap / "jina-reranker-m0-F16.gguf")
    shutil.copy(tiny_ggufs["f32"].parent / "mlp_weights.npz", snap / "mlp_weights.npz")
    return tmp_path / "hub"


def test_split_ref():
    assert split_ref(f"{REPO}:Q8_0", None) == (REPO, "Q8_0")
    assert split_ref(REPO, "q4_k_m") == (REPO, "q4_k_m")
    with pytest.raises(RerankerError, match="contradicts"):
        split_ref(f"{REPO}:Q8_0", "F16")


@pytest.mark.slow
def test_repo_quant_from_cache_offline(hf_cache):
    files = resolve(f"{REPO}:F32", cache_dir=hf_cache, local_files_only=True)
    assert files.gguf.name == "jina-reranker-m0-F32.gguf" and files.head.name == "mlp_weights.npz"
    assert resolve(REPO, cache_dir=hf_cache, local_files_only=True).gguf.name == "jina-reranker-m0-F16.gguf"
    r = Reranker.from_pretrained(REPO, quant="f32", cache_dir=hf_cache, local_files_only=True, device="cpu", n_ctx=1024)
    assert 0 < r.compute_score(["q", "d"]) < 1
    r.close()


def test_missing_quant_lists_what_is_there(hf_cache):
    with pytest.raises(RerankerError, match=r"no GGUF for quant 'Q4_K_M'.*jina-reranker-m0-F16.gguf"):
        resolve(f"{REPO}:Q4_K_M", cache_dir=hf_cache, local_files_only=True)


def test_offline_without_cache_says_how_to_get_it(tmp_path):
    with pytest.raises(RerankerError, match="not in the local Hugging Face cache.*hf download"):
        resolve(f"{REPO}:Q8_0", cache_dir=tmp_path / "empty", local_files_only=True)


def test_local_folder_and_file(tiny_ggufs):
    folder = tiny_ggufs["f16"].parent
    assert resolve(str(folder)).gguf == tiny_ggufs["f16"]
    files = resolve(str(tiny_ggufs["f32"]))
    assert files.gguf == tiny_ggufs["f32"] and files.head == tiny_ggufs["f32"].parent / "mlp_weights.npz"


@pytest.mark.slow
def test_hub_repo_mmproj_in_the_cache_is_found(hf_cache, tiny_ggufs):
    """A vision projector downloaded with the repo's GGUF (`hf download ... --include 'mmproj-*'`) is used for images."""
    import numpy as np
    from PIL import Image

    snap = next((hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    mmproj = next(tiny_ggufs["f32"].parent.glob("mmproj-*.gguf"))
    shutil.copy(mmproj, snap / mmproj.name)
    image = Image.fromarray(np.full((56, 84, 3), 128, np.uint8))
    with Reranker.from_pretrained(REPO, quant="f32", cache_dir=hf_cache, local_files_only=True, device="cpu", n_ctx=1024) as r:
        assert 0 < r.compute_score(["q", image], doc_type="image") < 1
        assert r.vision.path.name == mmproj.name


def _snapshot(hf_cache):
    return next((hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())


def test_text_download_leaves_projectors_out():
    """`*Q8_0*.gguf` matches `mmproj-...-Q8_0.gguf` too: huggingface_hub's own filter must keep only the backbone and head."""
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["jina-reranker-m0-Q8_0.gguf", "mmproj-jina-reranker-m0-Q8_0.gguf", "mmproj-model-q8_0.gguf",
                  "jina-reranker-m0-F16.gguf", "mlp_weights.npz", "README.md"]
    allow, ignore = hub_patterns("q8_0")
    assert sorted(filter_repo_objects(repo_files, allow_patterns=allow, ignore_patterns=ignore)) == [
        "jina-reranker-m0-Q8_0.gguf", "mlp_weights.npz"]


def test_hub_projector_offline_from_the_gguf_commit(hf_cache, tiny_ggufs):
    source = resolve(f"{REPO}:F32", cache_dir=hf_cache, local_files_only=True).hub
    assert (source.repo, source.revision) == (REPO, COMMIT)
    with pytest.raises(RerankerError, match=rf"not in the local Hugging Face cache, and offline mode is on.*"
                                            rf"hf download {REPO} --revision {COMMIT} --include 'mmproj\*.gguf'.*mmproj="):
        mmproj_from_hub(source)
    mmproj = next(tiny_ggufs["f32"].parent.glob("mmproj-*.gguf"))
    shutil.copy(mmproj, _snapshot(hf_cache) / "mmproj-jina-reranker-m0-F16.gguf")
    assert mmproj_from_hub(source) == _snapshot(hf_cache) / "mmproj-jina-reranker-m0-F16.gguf"
    shutil.copy(mmproj, _snapshot(hf_cache) / "mmproj-jina-reranker-m0-Q8_0.gguf")
    with pytest.raises(RerankerError, match=r"several vision projectors in .*mmproj-jina-reranker-m0-F16.gguf, "
                                            r"mmproj-jina-reranker-m0-Q8_0.gguf; pass mmproj="):
        mmproj_from_hub(source)


@pytest.fixture()
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT at a local port nothing listens on: every Hub request fails to connect, as with no network."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_projector_when_the_hub_is_unreachable(hf_cache, tiny_ggufs, unreachable_hub):
    """As snapshot_download does, an unreachable Hub falls back to the cache: the GGUF loads, the projector comes from
    the cached snapshot, and an uncached one is an error that says the Hub was unreachable."""
    source = resolve(f"{REPO}:F32", cache_dir=hf_cache, local_files_only=False).hub
    assert source.revision == COMMIT and source.local_files_only is False
    with pytest.raises(RerankerError, match=r"not in the local Hugging Face cache, and the Hub is unreachable.*hf download"):
        mmproj_from_hub(source)
    mmproj = next(tiny_ggufs["f32"].parent.glob("mmproj-*.gguf"))
    shutil.copy(mmproj, _snapshot(hf_cache) / mmproj.name)
    assert mmproj_from_hub(source) == _snapshot(hf_cache) / mmproj.name


@pytest.mark.slow
def test_hub_model_without_projector_fails_on_the_first_image_only(hf_cache):
    """Text-only use of a Hub model never looks for the projector; the first image names what to do."""
    import numpy as np
    from PIL import Image

    with Reranker.from_pretrained(REPO, quant="f32", cache_dir=hf_cache, local_files_only=True, device="cpu", n_ctx=1024) as r:
        assert 0 < r.compute_score(["q", "d"]) < 1
        image = Image.fromarray(np.full((56, 84, 3), 128, np.uint8))
        with pytest.raises(RerankerError, match=rf"{REPO}'s vision projector.*offline mode is on.*--include 'mmproj\*.gguf'"):
            r.compute_score(["q", image], doc_type="image")


def test_a_level_is_the_file_names_ending():
    """`*F16*.gguf` fetched the BF16 file too, `*Q4_K*` both Q4_K_M and Q4_K_S: huggingface_hub's own filter, given our
    patterns, keeps the one file of the level (named as llama.cpp and the Hub's repos name them) and the head."""
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["m0-F16.gguf", "m0-BF16.gguf", "m0-Q4_K_M.gguf", "m0-Q4_K_S.gguf", "m0.q8_0.gguf", "m0_Q6_K.gguf",
                  "mmproj-m0-F16.gguf", "mlp_weights.npz", "README.md"]

    def fetched(quant):
        allow, ignore = hub_patterns(quant)
        return sorted(filter_repo_objects(repo_files, allow_patterns=allow, ignore_patterns=ignore))

    assert fetched("F16") == fetched("f16") == ["m0-F16.gguf", "mlp_weights.npz"]
    assert fetched("BF16") == ["m0-BF16.gguf", "mlp_weights.npz"]
    assert fetched("q4_k_m") == ["m0-Q4_K_M.gguf", "mlp_weights.npz"]
    assert fetched("Q8_0") == ["m0.q8_0.gguf", "mlp_weights.npz"]
    assert fetched("Q6_K") == ["m0_Q6_K.gguf", "mlp_weights.npz"]


@pytest.mark.parametrize("ref,message", [
    (f"{REPO}:K", r"quant 'K' is not a GGUF level; choose one of .*Q4_K_M"),
    (f"{REPO}:Q4_K", r"quant 'Q4_K' is not a GGUF level"),
    ("models/out/gguf", r"no local file or folder models/out/gguf \(and it is not a Hub id like 'owner/name'\)"),
    ("./models/gguf", r"no local file or folder ./models/gguf"),
    ("models/tiny-gguf", r"models/tiny-gguf:F16 is not in the local Hugging Face cache and offline mode is on, and there is "
                         r"no local file or folder models/tiny-gguf either"),
    ("not a repo", r"no local file or folder not a repo, and it is not a Hub id like 'owner/name'"),
])
def test_references_that_name_nothing(tmp_path, monkeypatch, ref, message):
    monkeypatch.chdir(tmp_path)  # nothing here: no local folder of these names
    with pytest.raises(RerankerError, match=message):
        resolve(ref, cache_dir=tmp_path / "hub", local_files_only=True)
