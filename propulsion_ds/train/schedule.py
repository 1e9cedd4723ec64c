"""Learning-rate multipliers: linear warm-up, then constant, linear or cosine decay to zero."""
from __future__ import annotations

import math


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"train.schedule: unknown schedule {schedule!r}")
    return f
