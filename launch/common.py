"""What every entry point shares: quiet logs, one-line errors, and the exit codes."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# Exit codes live with the errors that carry them (propulsion_ds/errors.py; docs/RELIABILITY.md "Exit codes").
from propulsion_ds.errors import EXIT_USAGE, PropulsionError


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


@contextlib.contextmanager
def one_line_errors(squash: bool = False):
    """PropulsionError -> its message and ``exit_code`` (VerificationError 1, bad input 2);
    OSError -> the file and the reason, exit 2. ``squash`` joins a multi-line message (DeepSpeed's)."""
    try:
        yield
    except PropulsionError as e:
        fail(" ".join(str(e).split()) if squash else str(e), e.exit_code)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
