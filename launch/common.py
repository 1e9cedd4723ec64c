"""What every entry point shares: quiet logs, one-line errors, and the exit codes."""
from __future__ import annotations

import logging
import os
import sys
import warnings

# Exit codes of the entry points, in one place (README.md "Reliability"; launch/train.py's docstring).
EXIT_OK = 0
EXIT_PEER_LOST = 1        # another rank died or stopped answering; resume with --resume
EXIT_USAGE = 2            # bad input, or output that cannot be written; one "error: ..." line
EXIT_STOPPED = 3          # stopped on purpose: diverged (train.max_bad_steps)
EXIT_PREEMPTED = 75       # EX_TEMPFAIL: checkpoint written on SIGUSR1/SIGTERM; resume me.
                          # The same value as propulsion_ds.engine.EXIT_PREEMPTED (a test checks it);
                          # kept here too so entry points need not import the engine (torch) for it.
EXIT_INTERRUPTED = 130    # Ctrl-C, no checkpoint written


def setup_logging() -> None:
    # torch 2.13 + deepspeed emit dozens of FutureWarnings per run; they drown the real messages.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0"))))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # HF_HUB_OFFLINE is the user's to set (a Hub id may need a download); data is local only.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def fail(message: str, code: int = EXIT_USAGE) -> "None":
    """One line on stderr naming what is wrong, then exit (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
