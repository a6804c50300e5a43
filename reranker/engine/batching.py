"""Group sequences into decode calls under a token budget and a sequence-count limit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def pack(lengths: Sequence[int], token_budget: int, max_seqs: int) -> Iterator[list[int]]:
    """Yield lists of indices, in input order, each fitting one decode call.

    A sequence longer than the budget gets a group of its own (the caller feeds it in chunks).
    """
    group: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if group and (used + n > token_budget or len(group) == max_seqs):
            yield group
            group, used = [], 0
        group.append(i)
        used += n
        if used >= token_budget:
            yield group
            group, used = [], 0
    if group:
        yield group
