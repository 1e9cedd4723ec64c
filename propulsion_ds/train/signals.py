"""SIGUSR1/SIGTERM (SLURM's preemption warning, scancel) ask for a checkpoint, not a death."""
from __future__ import annotations

import signal


class StopRequest:
    """Set by the handlers; the loop checkpoints and stops at the next step boundary."""

    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        def handler(signum, frame):
            self.signum = signum
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal on another rank"
