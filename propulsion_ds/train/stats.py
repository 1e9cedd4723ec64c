"""A step's numbers across ranks, by name: what one rank summed over its window, and the one
all-reduce per step that turns those into totals plus the stop and write-error flags."""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

from propulsion_ds import data, distributed as dist
from propulsion_ds.train.loss import target_tokens


@dataclass
class WindowSums:
    loss_sum: float = 0.0         # per-token losses, summed
    targets: float = 0.0          # target (label) tokens
    tokens: float = 0.0           # real (non-pad) tokens
    rows: float = 0.0             # packed/padded rows

    def add(self, loss_sum: torch.Tensor, batch: dict) -> None:
        self.loss_sum += float(loss_sum.detach())
        self.targets += target_tokens(batch)
        self.tokens += float(data.real_tokens(batch))
        self.rows += float(batch["input_ids"].shape[0])


@dataclass
class StepTotals:
    sums: WindowSums              # over every rank
    stop: bool                    # some rank got a stop signal
    write_failed: bool            # rank 0 could not write metrics/TensorBoard
    peak_memory: list             # bytes, per rank


def reduce_step(sums: WindowSums, stop: bool, write_failed: bool, peak_bytes: int,
                rank: int, world: int) -> StepTotals:
    """Collective: one all-reduce for everything a step logs and every rank must agree on."""
    n = len(fields(WindowSums))
    memory = [0.0] * world
    memory[rank] = float(peak_bytes)
    out = dist.all_reduce(list(astuple(sums)) + [float(stop), float(write_failed)] + memory)
    return StepTotals(WindowSums(*out[:n]), out[n] > 0, out[n + 1] > 0, out[n + 2:])


def window_targets(window: list) -> float:
    """Collective: the target tokens of an accumulation window on all ranks."""
    n, = dist.all_reduce([float(sum(target_tokens(b) for b in window))])
    return n
