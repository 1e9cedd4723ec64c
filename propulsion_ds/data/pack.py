"""Packing: whole samples into rows of at most ``max_length`` tokens, no cross-document attention.

A packed row holds ``input_ids``, ``labels`` and ``position_ids``; positions restart at 0 for every
document and the label at each document's first token is -100 (it would be predicted from the
previous document's last token). transformers isolates the documents from ``position_ids`` alone
when the forward gets no ``attention_mask`` and no cache (see notes/packing-in-transformers.md), so
a document's loss in a packed row equals its loss alone.

That detection works per row of a batch for ``sdpa`` and ``eager`` (a 4D mask built from each row's
positions), but the flash-attention kernels read documents from ``position_ids`` only in a batch of
ONE row: with more rows every row is one sequence and its documents attend to each other.
``model_inputs`` therefore hands any other kernel the micro-batch as one flattened row with the
document boundaries spelled out (``cu_seq_lens_q/k``, ``max_length_q/k``: the varlen arguments
transformers' flash-attention path takes as they are).

Placement is best-fit decreasing: samples sorted by length (longest first, ties in data order),
each goes into the open row with the least room that still fits it, else opens a new row. It is a
pure function of the lengths, so every rank and every run packs identically. An instruction/chat
sample is never split (tokenizing already truncated it to ``max_length``); a text document longer
than ``max_length`` is cut into ``max_length`` pieces first, each its own document.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import torch

import datasets

from .files import DataError
from .tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (rows) of item indices; every item must be 1 <= length <= capacity.

    Rows are numbered in the order they are opened; items in a row in the order they were placed.
    ``free`` is a bitmask over remaining room (bit c set: some open row has exactly c tokens left),
    so the best-fitting row is the lowest set bit at or above the item's length: O(capacity/64)
    machine-word operations per item, no per-row scan.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}   # room left -> open rows with exactly that room (a stack)
    free = 0
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        above = free >> n
        if above:
            room = n + ((above & -above).bit_length() - 1)
            stack = by_room[room]
            r = stack.pop()
            if not stack:
                free &= ~(1 << room)
                del by_room[room]
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left:  # a full row never takes anything again
            by_room.setdefault(left, []).append(r)
            free |= 1 << left
    return rows


def _flat(ds: datasets.Dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list column, as numpy, honouring any indices mapping."""
    col = ds.with_format("arrow")[:][column] if ds._indices is not None else ds.data.column(column)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    # int32 before numpy: half the memory of the int64 the tokenizing maps write
    values = pc.cast(pc.list_flatten(col), pa.int32()).to_numpy(zero_copy_only=False)
    return values, lengths


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def split_documents(starts: np.ndarray, lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every (start, length) span into pieces of at most ``max_length``; drop 1-token pieces
    (their only label is the document start, so they hold no target)."""
    n_pieces = np.maximum(1, -(-lengths // max_length))
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    p_start = starts[doc] + k * max_length
    p_len = np.minimum(max_length, lengths[doc] - k * max_length)
    keep = p_len >= 2
    return p_start[keep], p_len[keep]


def pack(samples: datasets.Dataset, max_length: int, name: str, split_long: bool = False,
         out_file: Optional[str] = None) -> datasets.Dataset:
    """Pack tokenized samples (``input_ids``/``labels``) into rows of at most ``max_length``.

    ``split_long`` (text): a sample longer than ``max_length`` becomes several documents;
    otherwise every sample must already fit. Returns a dataset with ``input_ids``, ``labels`` and
    ``position_ids`` (int32 lists), one packed row each; in memory, or memory-mapped from
    ``out_file`` (an arrow stream written here) when given.
    """
    ids, lengths = _flat(samples, "input_ids")
    labels, _ = _flat(samples, "labels")
    starts = np.cumsum(lengths) - lengths
    if split_long:
        starts, lengths = split_documents(starts, lengths, max_length)
    elif len(lengths) and lengths.max() > max_length:
        raise ValueError(f"{name}: a sample has {lengths.max()} tokens, more than max_length={max_length}")
    # a document's first label is never a target once packed: keep only documents with another one
    csum = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int32 if len(labels) < 2**31 else np.int64)])
    keep = csum[starts + lengths] - csum[np.minimum(starts + 1, starts + lengths)] > 0
    if not keep.all():
        logger.warning("%s: %d documents dropped: no target token after the first", name, int((~keep).sum()))
        starts, lengths = starts[keep], lengths[keep]
    if not len(lengths):
        raise DataError(f"{name}: no document left to pack")
    rows = best_fit_decreasing(lengths, max_length)
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    order = np.fromiter((d for r in rows for d in r), dtype=np.int64, count=len(lengths))
    total = int(lengths.sum())
    logger.info("%s: packed %d documents (%d tokens) into %d rows of <= %d tokens (%.1f%% full)",
                name, len(lengths), total, len(rows), max_length, 100.0 * total / (len(rows) * max_length))
    # Gather the documents in row order, a chunk of rows at a time (vectorised, bounded memory);
    # with out_file the chunks stream to an arrow file that is then memory-mapped.
    chunks = _row_chunks(ids, labels, starts, lengths, order, counts, max(1, min(65536, 2**30 // max_length)))
    if out_file is None:
        return datasets.Dataset(pa.Table.from_batches(list(chunks)))
    first = next(chunks)
    with pa.OSFile(out_file, "wb") as sink, pa.ipc.new_stream(sink, first.schema) as writer:
        writer.write_batch(first)
        for batch in chunks:
            writer.write_batch(batch)
    return datasets.Dataset.from_file(out_file)


def _row_chunks(ids, labels, starts, lengths, order, counts, chunk_rows):
    """Record batches of ``chunk_rows`` packed rows (< 2**30 tokens each: int32 list offsets)."""
    doc_edges = np.concatenate([[0], np.cumsum(counts)])
    for r0 in range(0, len(counts), chunk_rows):
        r1 = min(r0 + chunk_rows, len(counts))
        docs = order[doc_edges[r0]:doc_edges[r1]]
        doc_len = lengths[docs]
        dst_start = np.cumsum(doc_len) - doc_len
        n = int(doc_len.sum())
        gather = np.arange(n, dtype=np.int64) + np.repeat(starts[docs] - dst_start, doc_len)
        out_ids = ids[gather].astype(np.int32)
        out_labels = labels[gather].astype(np.int32)
        out_labels[dst_start] = IGNORE_INDEX
        positions = (np.arange(n, dtype=np.int64) - np.repeat(dst_start, doc_len)).astype(np.int32)
        c = counts[r0:r1]
        offsets = np.concatenate([[0], np.cumsum(np.add.reduceat(doc_len, np.cumsum(c) - c))])
        yield pa.record_batch([_list_array(out_ids, offsets), _list_array(out_labels, offsets),
                               _list_array(positions, offsets)], names=["input_ids", "labels", "position_ids"])


def truncate(samples: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Each sample cut to its first ``max_length`` tokens (the unpacked view of text documents)."""
    def cut(batch):
        return {k: [x[:max_length] for x in batch[k]] for k in ("input_ids", "labels")}
    return samples.map(cut, batched=True, keep_in_memory=True, load_from_cache_file=False, desc="truncate")


def document_lengths(position_ids) -> list[int]:
    """Lengths of the documents in one packed row, read from its restarting positions."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]




# Kernels that isolate the documents of every row of a packed batch from position_ids alone;
# any other (flash_attention_2, hub kernels) gets the flattened row with explicit boundaries.
ROW_ISOLATING = frozenset({"sdpa", "eager", "flex_attention"})


def attn_implementation(model) -> Optional[str]:
    """The attention kernel a (DeepSpeed-wrapped) transformers model runs, or None."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None)


def flatten_packed(batch: dict) -> dict:
    """A packed micro-batch of B rows as ONE row of B*T tokens plus its document boundaries.

    ``position_ids`` already restart at 0 at every document, at each row's pad tail and so at each
    row start; ``cu_seq_lens_q/k`` (int32, the offsets of those starts plus the total) and
    ``max_length_q/k`` (the longest document) say the same explicitly. ``labels``, when present,
    get -100 at each row's first token: in the flat row that token is predicted from the previous
    row's last one (a document start is -100 already; this keeps it so whatever the rows hold).
    """
    pos = batch["position_ids"]
    flat_pos = pos.reshape(1, -1)
    starts = torch.nonzero(flat_pos[0] == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start every row at 0")
    total = torch.tensor([flat_pos.shape[1]], device=pos.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int(cu.diff().max())
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids")}
    out.update(input_ids=batch["input_ids"].reshape(1, -1), position_ids=flat_pos,
               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if "labels" in batch:
        labels = batch["labels"].clone()
        labels[:, 0] = IGNORE_INDEX
        out["labels"] = labels.reshape(1, -1)
    return out


def model_inputs(batch: dict, attn_impl: Optional[str]) -> dict:
    """``batch`` as the forward of a model running ``attn_impl`` must get it: a packed batch
    (``position_ids``, no mask) flattened into one row unless the kernel isolates documents per
    row; anything else, or an unknown model (``attn_impl`` None), unchanged."""
    if "position_ids" not in batch or "attention_mask" in batch or attn_impl is None or attn_impl in ROW_ISOLATING:
        return batch
    return flatten_packed(batch)
