"""`--devices` parsing for the multi-process job."""

from __future__ import annotations

import pytest

from reranker import RerankerError
from reranker.jobs.devices import parse_devices


@pytest.mark.parametrize("spec,want", [
    (None, []), ("", []), ("0", ["0"]), ("0,1", ["0", "1"]), (" 2 , 3 ", ["2", "3"]),
    ("cpu", ["cpu"]), ("cpu,cpu", ["cpu", "cpu"]), ("0,", ["0"]),
])
def test_valid_specs(spec, want):
    assert parse_devices(spec) == want


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
