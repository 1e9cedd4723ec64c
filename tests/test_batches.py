"""Eval micro-batches (``data.batches.eval_batches``): a seeded sample of rows, the same rows for
any number of ranks, dealt so every rank runs the same number of forwards (ZeRO-3 collectives)."""
from __future__ import annotations

import pytest

from propulsion_ds.data.batches import eval_batches


def evaluated_rows(n, mbs, world, max_rows, seed=0) -> tuple[list, list]:
    """(sorted rows counted on all ranks, micro-batches per rank)."""
    rows, per_rank = [], []
    for rank in range(world):
        plan = eval_batches(n, mbs, rank, world, max_rows, seed)
        per_rank.append(len(plan))
        for idx, counted in plan:
            assert 1 <= len(idx) <= mbs
            if counted:
                rows += idx
    return sorted(rows), per_rank


@pytest.mark.parametrize("n,mbs,max_rows", [(100, 4, 20), (37, 3, 100), (9, 4, 7), (1, 2, 8)])
def test_the_same_rows_for_any_number_of_ranks(n, mbs, max_rows):
    one, _ = evaluated_rows(n, mbs, 1, max_rows)
    assert len(one) == len(set(one)) == min(n, max_rows)
    for world in (2, 3, 8):
        rows, per_rank = evaluated_rows(n, mbs, world, max_rows)
        assert rows == one, world                      # no row twice, none missing
        assert len(set(per_rank)) == 1, per_rank        # every rank runs as many forwards


def test_a_seeded_sample_not_the_first_rows():
    rows, _ = evaluated_rows(1000, 4, 2, 40, seed=3)
    assert rows != list(range(40))                      # packed rows are stored longest first
    assert rows == evaluated_rows(1000, 4, 1, 40, seed=3)[0] == evaluated_rows(1000, 4, 2, 40, seed=3)[0]
    assert rows != evaluated_rows(1000, 4, 2, 40, seed=4)[0]
