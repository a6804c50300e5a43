"""The request schemas take what the library takes: one source for the chunking fields and their bounds."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from reranker import Chunking, RerankerError
from reranker.serve.schemas import ChunkingField


def test_chunking_field_has_chunkings_fields():
    assert list(ChunkingField.model_fields) == [f.name for f in dataclasses.fields(Chunking)]


@pytest.mark.parametrize("field, value", [("size", 7), ("size", 8), ("overlap", -1), ("overlap", 0), ("max_chunks", 0),
                                          ("max_chunks", 1), ("aggregate", "median"), ("aggregate", "first")])
def test_chunking_field_bounds_are_chunkings(field, value):
    try:
        Chunking(**{field: value})
        library = True
    except RerankerError:
        library = False
    try:
        ChunkingField.model_validate({field: value})
        schema = True
    except ValidationError:
        schema = False
    assert schema == library
