"""Non-finite losses and gradients: noticed per rank, agreed on by every rank, counted, and a run
that keeps producing them is stopped (train.max_bad_steps) before it poisons the vectors."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from propulsion_ds import distributed as dist
from propulsion_ds.errors import TrainingError
from propulsion_ds.train.progress import TrainingProgress

log = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int, progress: TrainingProgress, last_good: Callable[[], str]):
        self.max_bad_steps = max_bad_steps
        self.progress = progress
        self.last_good = last_good
        self.bad_in_row = 0           # non-finite micro-batches / updates since the last applied update
        self._grad_bad = False

    def watch(self, params) -> None:
        """A tensor hook on every trainable parameter notes a non-finite local gradient."""
        for p in params:
            p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor):
        if not self._grad_bad and not bool(torch.isfinite(grad).all()):
            self._grad_bad = True
        return None

    def loss_ok(self, loss_sum: torch.Tensor) -> bool:
        """Collective: whether every rank's loss is finite; if not, the micro-batch is dropped on all."""
        bad, = dist.all_reduce([float(not torch.isfinite(loss_sum.detach()))])
        if bad == 0:
            return True
        self.bad_in_row += 1
        self.progress.skipped_batches += 1
        self._stop_if_diverged("non-finite loss, micro-batch dropped")
        return False

    def grads_bad(self) -> bool:
        """Collective, at the accumulation boundary: whether any rank saw a non-finite gradient."""
        bad, = dist.all_reduce([float(self._grad_bad)])
        self._grad_bad = False
        return bad != 0

    def update_applied(self) -> None:
        self.bad_in_row = 0

    def update_discarded(self, counts_as_bad: bool) -> None:
        self.progress.skipped_steps += 1
        if counts_as_bad:
            self.bad_in_row += 1
        self._stop_if_diverged("non-finite gradient, update discarded")

    def _stop_if_diverged(self, what: str) -> None:
        log.warning("step %d: %s (%d in a row)", self.progress.step + 1, what, self.bad_in_row)
        if self.bad_in_row >= self.max_bad_steps:
            raise TrainingError(
                f"{self.bad_in_row} non-finite losses or gradients in a row, the last: {what} "
                f"(train.max_bad_steps={self.max_bad_steps}); stopped. Last good "
                f"checkpoint: {self.last_good()}")
