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


def update_rows(n, micro, accum, world, seed=5, epochs=3) -> list:
    """The set of rows of each optimizer update under one split: each rank's micro-batches run on
    from one epoch into the next, as the trainer draws them, ``accum`` to an update."""
    from propulsion_ds.data.batches import epoch_batches

    drawn = [[b for epoch in range(epochs) for b in epoch_batches(n, micro, r, world, seed, epoch,
                                                                   accumulation=accum)] for r in range(world)]
    return [frozenset(i for plan in drawn for b in plan[u * accum:(u + 1) * accum] for i in b)
            for u in range(len(drawn[0]) // accum)]


def test_every_split_puts_the_same_rows_into_each_update_across_epochs():
    n, global_batch = 94, 16                            # 5 updates per epoch, 14 rows left out
    one = update_rows(n, 16, 1, 1)
    assert len(one) == 3 * (n // global_batch) and all(len(u) == global_batch for u in one)
    for micro, accum, world in ((8, 2, 1), (4, 2, 2), (2, 4, 2), (4, 1, 4)):
        assert update_rows(n, micro, accum, world) == one, (micro, accum, world)


def test_the_data_position_is_a_count_of_global_samples():
    from propulsion_ds.errors import DataError
    from propulsion_ds.train.progress import TrainingProgress
    from propulsion_ds.train.run_data import RunData, data_position

    rd = RunData(None, None, None, 0, batches_per_epoch=10, steps_per_epoch=5, max_steps=5)
    p = TrainingProgress(epoch=1, samples_in_epoch=48)          # 3 updates of 16 into epoch 1
    assert data_position(rd, p, per_draw=8) == 6 and p.batch_in_epoch == 6    # 2 ranks x 4
    assert data_position(rd, p, per_draw=16) == 3                              # 1 rank x 16
    with pytest.raises(DataError, match="48 samples into epoch 1"):
        data_position(rd, p, per_draw=32)
    old = TrainingProgress(epoch=2, batch_in_epoch=4, samples_in_epoch=None)    # an older checkpoint
    assert data_position(rd, old, per_draw=8) == 4 and old.samples_in_epoch == 32
