"""Guards around the optimizer update: a veto every rank applies alike."""
from __future__ import annotations

import types

import torch


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
