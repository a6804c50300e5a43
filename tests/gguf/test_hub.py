"""Model references: local files and folders, `repo:QUANT` from a Hugging Face cache, offline errors."""

from __future__ import annotations

import shutil

import pytest

from reranker import Reranker, RerankerError
from reranker.gguf.hub import resolve, split_ref

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
