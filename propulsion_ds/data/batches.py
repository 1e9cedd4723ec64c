"""Batches: index arithmetic over a built dataset's rows, and collation into model kwargs.

``epoch_batches`` gives rank ``r`` its micro-batches for one epoch (a seeded permutation of the
rows, sharded so every rank gets the same number of micro-batches); resuming at step position
``p`` of an epoch is ``epoch_batches(..., start=p)``: no data is re-read or re-tokenized. Packed
rows are fixed at build time, so shuffling is over rows.

An epoch is a whole number of global batches (micro-batch x ranks x accumulation): update ``u``
of an epoch is permutation slice ``[u*G, (u+1)*G)`` under every split of the same global batch
``G``, across epoch boundaries too, and the tail of fewer than ``G`` rows is left out of the epoch
(each epoch's permutation leaves out different rows).

``get_batch`` returns exactly the model's keyword arguments:

* unpacked rows: ``{input_ids, labels, attention_mask}``, right-padded to the longest row;
* packed rows: ``{input_ids, labels, position_ids}`` and NO ``attention_mask`` (a 2D mask, even
  all ones, switches transformers' packed-sequence detection off). The only padding is each row's
  tail, up to the longest row; its labels are -100 and its positions restart at 0, so the pad
  tail is a document of its own that nothing attends to. The forward must get ``use_cache=False``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

import datasets

from .files import DataError
from .tokens import IGNORE_INDEX


def batches_per_epoch(n_rows: int, micro_batch_size: int, world_size: int, accumulation: int = 1) -> int:
    """Micro-batches each rank runs per epoch: ``accumulation`` times the whole global batches
    (micro_batch_size x world_size x accumulation) in ``n_rows``; the tail is left out."""
    if micro_batch_size < 1 or world_size < 1 or accumulation < 1:
        raise ValueError(f"micro_batch_size, world_size and accumulation must be >= 1, got "
                         f"{micro_batch_size}, {world_size}, {accumulation}")
    return n_rows // (micro_batch_size * world_size * accumulation) * accumulation


def epoch_permutation(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The epoch's row order: ``torch.randperm`` seeded with ``seed + epoch`` (CPU generator)."""
    if not shuffle:
        return torch.arange(n_rows)
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    return torch.randperm(n_rows, generator=g)


def epoch_batches(n_rows: Union[int, Sequence], micro_batch_size: int, rank: int, world_size: int,
                  seed: int, epoch: int, shuffle: bool = True, start: int = 0,
                  accumulation: int = 1) -> list[list[int]]:
    """Row indices of rank ``rank``'s micro-batches for ``epoch``, from position ``start`` on.

    Step position ``p`` (0-based, counted in micro-batches) uses permutation slice
    ``[p*M*W, (p+1)*M*W)`` (M = micro_batch_size, W = world_size) and rank ``r`` takes the r-th
    M-sized chunk of it, so ranks are disjoint, all have ``batches_per_epoch`` batches, and
    ``epoch_batches(..., start=p) == epoch_batches(...)[p:]``. ``n_rows`` may be a dataset. The
    epoch holds whole global batches of ``M*W*accumulation`` rows (see the module docstring).
    """
    n = len(n_rows) if hasattr(n_rows, "__len__") else int(n_rows)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    n_batches = batches_per_epoch(n, micro_batch_size, world_size, accumulation)
    if n_batches == 0:
        raise DataError(f"data set has {n} rows, fewer than micro_batch_size*world_size*accumulation="
                        f"{micro_batch_size * world_size * accumulation}: no full batch")
    if not 0 <= start <= n_batches:
        raise ValueError(f"start={start} is outside the epoch's {n_batches} micro-batches")
    glob_b = micro_batch_size * world_size
    perm = epoch_permutation(n, seed, epoch, shuffle)[start * glob_b: n_batches * glob_b]
    mine = perm.view(-1, world_size, micro_batch_size)[:, rank, :]
    return mine.tolist()


def eval_batches(n_rows: Union[int, Sequence], micro_batch_size: int, rank: int, world_size: int,
                 max_rows: int, seed: int) -> list[tuple[list[int], bool]]:
    """Rank ``rank``'s eval micro-batches as ``(row indices, counted)``.

    The rows evaluated are a seeded sample of ``min(n_rows, max_rows)`` rows, the same rows for
    any number of ranks (not the first rows: packed rows are stored longest first), dealt to the
    ranks in turn and cut into micro-batches of at most ``micro_batch_size``. Every rank gets the
    same number of micro-batches, since a forward under ZeRO-3 is a collective: a rank short of
    rows runs a repeat of one sampled row that is not ``counted``.
    """
    n = len(n_rows) if hasattr(n_rows, "__len__") else int(n_rows)
    if micro_batch_size < 1 or max_rows < 1 or not 0 <= rank < world_size:
        raise ValueError(f"eval_batches: micro_batch_size={micro_batch_size}, max_rows={max_rows}, "
                         f"rank={rank}, world_size={world_size}")
    if n == 0:
        raise DataError("the eval set has no rows")
    take = min(n, max_rows)
    sample = epoch_permutation(n, seed, 0)[:take].tolist()
    mine = sample[rank::world_size]
    per_rank = -(-(-(-take // world_size)) // micro_batch_size)       # ceil(ceil(take / W) / M)
    batches = [(mine[i:i + micro_batch_size], True) for i in range(0, len(mine), micro_batch_size)]
    return batches + [([sample[0]], False)] * (per_rank - len(batches))


def collate(rows: Union[Sequence[dict], dict], pad_id: int, max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad rows (dicts with input_ids/labels[/position_ids], or one dict of lists) into LongTensors.

    Pads get ``pad_id`` in input_ids and -100 in labels; unpacked rows (no ``position_ids``) get an
    ``attention_mask`` (0 on pads), packed rows get ``position_ids`` (0, 1, ... again on the pad
    tail) and no mask. With ``max_length`` every batch is padded to exactly that length.
    """
    if isinstance(rows, dict):
        cols = {k: list(v) for k, v in rows.items()}
    else:
        cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    ids_list, lab_list = cols.get("input_ids", []), cols.get("labels", [])
    pos_list = cols.get("position_ids")
    if not ids_list:
        raise ValueError("collate got no rows")
    longest = max(len(x) for x in ids_list)
    width = longest if max_length is None else max_length
    if longest > width:
        raise ValueError(f"a row has {longest} tokens, more than max_length={max_length}")
    b = len(ids_list)
    input_ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    if pos_list is None:
        extra_name, extra = "attention_mask", torch.zeros((b, width), dtype=torch.long)
    else:
        extra_name, extra = "position_ids", torch.arange(width, dtype=torch.long).repeat(b, 1)
    for i, (x, y) in enumerate(zip(ids_list, lab_list)):
        n = len(x)
        if n != len(y):
            raise ValueError(f"row {i}: {n} input_ids but {len(y)} labels")
        input_ids[i, :n] = torch.as_tensor(x, dtype=torch.long)
        labels[i, :n] = torch.as_tensor(y, dtype=torch.long)
        if pos_list is None:
            extra[i, :n] = 1
        else:
            extra[i, :n] = torch.as_tensor(pos_list[i], dtype=torch.long)
            extra[i, n:] -= n  # the pad tail restarts at 0: a document of its own
    return {"input_ids": input_ids, "labels": labels, extra_name: extra}


def get_batch(ds: datasets.Dataset, indices: Sequence[int], pad_id: int,
              max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Fetch rows ``indices`` of a built dataset and collate them into model kwargs."""
    return collate(ds[list(indices)], pad_id, max_length)


def real_tokens(batch: dict) -> int:
    """Non-pad tokens in a batch from ``get_batch`` (for tokens/s and the padding share).

    Unpacked: the attention mask's sum. Packed: everything but each row's pad tail, which is the
    row's last segment (from the last position 0 on) when that segment has no target: every real
    document has at least one target, since documents without one are dropped when building.
    """
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    pos, labels = batch["position_ids"], batch["labels"]
    b, t = pos.shape
    idx = torch.arange(t, device=pos.device).expand(b, t)
    last_start = torch.where(pos == 0, idx, torch.zeros_like(idx)).max(dim=1).values
    in_last = idx >= last_start[:, None]
    tail_is_pad = ~((labels != IGNORE_INDEX) & in_last).any(dim=1)
    pad = torch.where(tail_is_pad, t - last_start, torch.zeros_like(last_start))
    return int(b * t - pad.sum())
