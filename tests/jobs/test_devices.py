"""`--devices` parsing for the multi-process job."""

from __future__ import annotations

import pytest

from reranker import RerankerError
from reranker.jobs.devices import parse_devices


@pytest.mark.parametrize("spec,want", [
    (None, []), ("", []), ("0", ["0"]), ("0,1", ["0", "1"]), (" 2 , 3 ", ["2", "3"]),
    ("cpu", ["cpu"]), ("cpu,cpu", ["cpu", "cpu"]), ("0,", ["0"]),
])
def test_valid_specs(spec, want, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_devices(spec) == want


def test_gpu_indices_count_within_the_jobs_own_mask(monkeypatch):
    from reranker.jobs.devices import visible_gpu

    # Under CUDA_VISIBLE_DEVICES=2,3 (a scheduler's mask) GPU 0 is physical GPU 2: a device process must take 2,
    # never physical GPU 0, which belongs to someone else (it used to set CUDA_VISIBLE_DEVICES=0).
    assert [visible_gpu(i, "2,3") for i in ("0", "1")] == ["2", "3"]
    assert visible_gpu("1", None) == "1" and visible_gpu("1", "") == "1"
    assert visible_gpu("0", "GPU-5a1b,GPU-77c2") == "GPU-5a1b"  # UUIDs, as schedulers may give them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse_devices("0,1") == ["0", "1"]
    with pytest.raises(RerankerError, match=r"GPU 2 is not among the 2 this job may use \(CUDA_VISIBLE_DEVICES=2,3\)"):
        parse_devices("0,2")


@pytest.mark.parametrize("spec", ["bogus", "0,gpu", "-1", "cuda:0", "1.5"])
def test_invalid_specs_name_the_bad_part(spec):
    with pytest.raises(RerankerError, match="neither a GPU index nor 'cpu'"):
        parse_devices(spec)


def test_all_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        assert parse_devices("all") == [str(i) for i in range(torch.cuda.device_count())]
    else:
        with pytest.raises(RerankerError, match="no CUDA device"):
            parse_devices("all")
