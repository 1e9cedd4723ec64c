"""SIGUSR1/SIGTERM (SLURM's preemption warning, scancel) ask for a checkpoint, not a death.

The training loop reads the flag at every step boundary (inside its one per-step all-reduce); an
eval or a generation loop asks ``StopRequest.agreed()`` between its batches, so a stop is honoured
within one batch wherever the run is, and every rank learns it in the same collective.
"""
from __future__ import annotations

import signal

from propulsion_ds import distributed as dist
from propulsion_ds.errors import StopDuringEval


class StopRequest:
    """Set by the handlers; the loop checkpoints and stops at the next step boundary."""

    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        def handler(signum, frame):
            self.signum = signum
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Collective: whether any rank has a stop request. Every rank must call it equally often
        (between eval batches: every rank runs the same number of them)."""
        flag, = dist.all_reduce([float(self.signum > 0)])
        return flag > 0

    def check(self) -> None:
        """Collective: raise StopDuringEval when any rank has a stop request (the eval loops' hook)."""
        if self.agreed():
            raise StopDuringEval(self.name())

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal on another rank"
