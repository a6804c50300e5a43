"""`pack`: prompts -> groups that each fit one decode call, in input order."""

from __future__ import annotations

import random

import pytest

from reranker.engine.batching import pack


def check(lengths, budget, max_seqs):
    groups = list(pack(lengths, budget, max_seqs))
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every index once, in order
    for g in groups:
        assert 1 <= len(g) <= max_seqs
        if len(g) > 1:
            assert sum(lengths[i] for i in g) <= budget
    return groups


def test_fills_to_the_budget_then_starts_a_new_group():
    assert check([3, 3, 3, 3], budget=6, max_seqs=8) == [[0, 1], [2, 3]]
    assert check([4, 3, 2], budget=6, max_seqs=8) == [[0], [1, 2]]


def test_sequence_limit():
    assert check([1] * 5, budget=100, max_seqs=2) == [[0, 1], [2, 3], [4]]


def test_a_long_sequence_gets_its_own_group():
    assert check([2, 10, 2], budget=4, max_seqs=8) == [[0], [1], [2]]
    assert check([10], budget=4, max_seqs=8) == [[0]]


def test_empty_input():
    assert list(pack([], 16, 4)) == []


@pytest.mark.parametrize("seed", range(20))
def test_random_lengths_keep_the_invariants(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    check(lengths, budget=rng.choice([64, 256, 512]), max_seqs=rng.choice([1, 4, 64]))
