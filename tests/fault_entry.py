"""Fault injection for the tests: the real training CLI, with faults patched into its seams.

Run in place of launch/train.py, with the same arguments:

    FAULT_NAN_LOSS=4 FAULT_NAN_RANK=1 torchrun --nproc_per_node 2 tests/fault_entry.py --config ...
    FAULT_SLOW_CHECKPOINT=1.0:2 python tests/fault_entry.py --config ...

Environment (read once, at start; none set: launch/train.py unchanged):
- FAULT_NAN_LOSS=3,4 / 5-8 / 5-: the training loss is NaN at those micro-batches, counted from 1
  over the micro-batches this process draws for training (Trainer.train_loss_sum calls);
- FAULT_NAN_GRAD=...: the loss stays finite but its gradient is NaN at those micro-batches;
- FAULT_NAN_RANK=r: the two above apply on rank r only (default: every rank);
- FAULT_SLOW_CHECKPOINT=SECONDS[:STEP]: sleep SECONDS at the end of each phase of a checkpoint
  save (of every save, or of step STEP's only), after logging
  "test hook FAULT_SLOW_CHECKPOINT: step_N phase P, sleeping S s", so a test can kill the
  process, or fill the disk, inside phase P: written (every rank's files agreed), meta
  (meta.json written), renamed (step_N in place), latest (`latest` rewritten), trash (an old
  checkpoint renamed out of sight, not yet deleted).
- FAULT_NODE_LOCAL=DIR: each rank's output_dir is DIR/node<RANK>, as if every rank wrote to a disk
  of its own under the same path (node-local disks).
- FAULT_SIGNAL_IN_EVAL=N: at this process's N-th eval forward (counted from 1 over the run's
  eval-loss micro-batches), the process sends itself SIGUSR1 (on rank FAULT_SIGNAL_RANK only, when
  set), after logging "test hook FAULT_SIGNAL_IN_EVAL: eval forward N".
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time

import torch

log = logging.getLogger("fault_entry")

NAN_LOSS, NAN_GRAD, NAN_RANK = "FAULT_NAN_LOSS", "FAULT_NAN_GRAD", "FAULT_NAN_RANK"
SLOW_CHECKPOINT = "FAULT_SLOW_CHECKPOINT"
NODE_LOCAL = "FAULT_NODE_LOCAL"
SIGNAL_IN_EVAL, SIGNAL_RANK = "FAULT_SIGNAL_IN_EVAL", "FAULT_SIGNAL_RANK"
# Phase name -> the checkpoint function whose return ends it (see checkpoint.save).
PHASES = {"written": "_write_parts", "meta": "_seal", "renamed": "_rename",
          "latest": "_point_latest", "trash": "_trash"}


def parse_counts(text: str | None):
    """"3,4" / "5-8" / "5-" -> a predicate on 1-based counts."""
    if not text:
        return lambda n: False
    singles, ranges = set(), []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            ranges.append((int(lo), int(hi) if hi.strip() else None))
        elif part:
            singles.add(int(part))
    return lambda n: n in singles or any(n >= lo and (hi is None or n <= hi) for lo, hi in ranges)


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def patch_loss(env=os.environ) -> None:
    nan_loss, nan_grad = parse_counts(env.get(NAN_LOSS)), parse_counts(env.get(NAN_GRAD))
    only_rank = int(env[NAN_RANK]) if env.get(NAN_RANK) else None
    if not (env.get(NAN_LOSS) or env.get(NAN_GRAD)):
        return
    from propulsion_ds import distributed as dist
    from propulsion_ds.train.recipe import Trainer

    real = Trainer.train_loss_sum
    drawn = [0]

    @functools.wraps(real)
    def train_loss_sum(self, batch):
        drawn[0] += 1
        loss = real(self, batch)
        if only_rank is not None and only_rank != dist.rank():
            return loss
        if nan_loss(drawn[0]):
            loss = loss * float("nan")
        if nan_grad(drawn[0]):
            loss = NanGrad.apply(loss)
        return loss
    Trainer.train_loss_sum = train_loss_sum


def patch_checkpoint(env=os.environ) -> None:
    spec = env.get(SLOW_CHECKPOINT)
    if not spec:
        return
    from propulsion_ds.train import checkpoint

    seconds, _, only = spec.partition(":")

    def slowed(phase, real):
        @functools.wraps(real)
        def wrapper(s, *args, **kwargs):
            out = real(s, *args, **kwargs)
            if not only or s.tag == f"step_{only}":
                log.warning("test hook %s: %s phase %s, sleeping %s s", SLOW_CHECKPOINT, s.tag, phase, seconds)
                time.sleep(float(seconds))
            return out
        return wrapper
    for phase, name in PHASES.items():
        setattr(checkpoint, name, slowed(phase, getattr(checkpoint, name)))


def patch_output_dir(env=os.environ) -> None:
    if env.get(NODE_LOCAL):
        sys.argv += ["--set", f"output_dir={env[NODE_LOCAL]}/node{env.get('RANK', '0')}"]


def patch_eval(env=os.environ) -> None:
    if not env.get(SIGNAL_IN_EVAL):
        return
    at, only_rank = int(env[SIGNAL_IN_EVAL]), env.get(SIGNAL_RANK)
    from propulsion_ds import distributed as dist
    from propulsion_ds.train import recipe

    real, done = recipe.forward_loss_sum, [0]

    @functools.wraps(real)
    def forward_loss_sum(engine, batch):
        if not engine.module.training:           # Trainer.evaluate; training runs in train mode
            done[0] += 1
            if done[0] == at and (only_rank is None or int(only_rank) == dist.rank()):
                log.warning("test hook %s: eval forward %d", SIGNAL_IN_EVAL, at)
                os.kill(os.getpid(), signal.SIGUSR1)
        return real(engine, batch)
    recipe.forward_loss_sum = forward_loss_sum


def main() -> int:
    patch_output_dir()
    patch_loss()
    patch_checkpoint()
    patch_eval()
    from launch.train import main as train_main

    return train_main()


if __name__ == "__main__":
    sys.exit(main())
