"""Guards around the optimizer update: a veto every rank applies alike, and test-only faults."""
from __future__ import annotations

import types

import torch

# Test-only fault injection (see README.md "Reliability"). Values are 1-based counts of the
# micro-batches this rank has drawn since the process started: "3,4", "5-8" or "5-" (5 on).
TEST_NAN_LOSS_ENV = "PROPULSION_TEST_NAN_LOSS"    # the loss becomes NaN
TEST_NAN_GRAD_ENV = "PROPULSION_TEST_NAN_GRAD"    # the loss stays finite, its gradient is NaN
TEST_NAN_RANK_ENV = "PROPULSION_TEST_NAN_RANK"    # only on this rank (default: every rank)


def parse_counts(text: str | None):
    """"3,4" / "5-8" / "5-" -> a predicate on 1-based counts (test-only env vars)."""
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
    """Test-only: identity forward, NaN gradient backward (a finite loss with a poisoned gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class UpdateGuard:
    """Lets the trainer veto one optimizer update (and its LR-schedule step) on every rank alike."""

    def __init__(self):
        self.skip = False


def guarded_adamw(params, guard: UpdateGuard, **kw):
    # A plain AdamW (ZeRO accepts only known optimizer types) whose step the guard can veto.
    # The wrapper sits on the instance; state_dict() holds only param groups and tensors.
    opt = torch.optim.AdamW(params, **kw)
    unguarded = opt.step

    def step(self, *args, **kwargs):
        if guard.skip:
            return None
        return unguarded(*args, **kwargs)
    opt.step = types.MethodType(step, opt)    # bound, as LRScheduler's own step counter expects
    return opt


def guarded_lambda_lr(optimizer, schedule, guard: UpdateGuard):
    """LambdaLR whose step the guard can veto, except its own initial step.

    LambdaLR's constructor calls step() once to set update 0's LR to lr * f(0). The engine builds
    the scheduler while the guard vetoes DeepSpeed's set-up optimizer step; vetoing that initial
    step too would leave update 0 at the full base LR and the schedule one step late.
    """
    constructed = []   # in the closure: an instance attribute would land in state_dict()

    class GuardedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *args, **kwargs):
            if guard.skip and constructed:
                return None
            return super().step(*args, **kwargs)
    scheduler = GuardedLambdaLR(optimizer, schedule)
    constructed.append(True)
    return scheduler
