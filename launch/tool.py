"""What the tool entry points (merge.py, export.py) share: a library error ends the command with
one ``error: ...`` line and the exit code its class carries (propulsion_ds/errors.py)."""
from __future__ import annotations

import contextlib

from launch.common import PropulsionError, fail


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
