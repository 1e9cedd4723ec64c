""""Rank 0 writes, every rank agrees": one place for the collective error agreement.

Every rank must leave a collective section with the same outcome, or the ranks that carry on
hang in their next collective while the one that failed exits. So a failure on any rank becomes
the same one-line error, raised on every rank, naming the rank, the file and the free space.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from propulsion_ds.errors import CheckpointError, PropulsionError


def one_line(e: BaseException, limit: int = 300) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:limit]


def free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _failures(msg: str | None) -> tuple[list[tuple[int, str]], int]:
    """Collective: every rank's message (None: no error); the failed ranks' ones and the world size."""
    msgs = [msg]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        msgs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(msgs, msg)
    return [(r, m) for r, m in enumerate(msgs) if m is not None], len(msgs)


def agree(error: BaseException | None, what: str, where: Path, after: str = "",
          error_type: type[PropulsionError] = CheckpointError) -> None:
    """Collective: raise the same ``error_type`` on every rank if any rank passed an error."""
    msg = None
    if error is not None:
        msg = one_line(error)
        if isinstance(error, OSError) and error.filename and str(error.filename) not in msg:
            msg += f" [{error.filename}]"
    failed, world = _failures(msg)
    if not failed:
        return
    r, m = failed[0]
    free = free_bytes(Path(where))
    space = ""
    if free is not None:
        full = free < 1024 * 1024 or "No space left" in m or "os error 28" in m
        space = f"; {free / 1024:.0f} KiB free there" + (": the disk is full" if full else "")
    rank = f"rank {r}: " if world > 1 else ""
    raise error_type(f"{what} ({rank}{m}{space}){after}")


def rank0_write(fn: Callable[[], object], what: str, where: Path, after: str = "",
                error_type: type[PropulsionError] = CheckpointError,
                catch: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Collective: rank 0 runs ``fn``; if it raises one of ``catch``, every rank raises alike."""
    error = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            fn()
        except catch as e:
            error = e
    agree(error, what, where, after, error_type)


def agree_as_is(error: BaseException | None, error_type: type[PropulsionError] = CheckpointError) -> None:
    """Collective: like ``agree``, for errors whose own message already names the file and the
    fix (a refused checkpoint): every rank raises the first failed rank's message unchanged."""
    failed, _ = _failures(None if error is None else str(error))
    if failed:
        raise error_type(failed[0][1])
