"""One run per output_dir: a lock file held for the run, and proof that every rank sees output_dir.

Before its first write into output_dir, rank 0 creates ``output_dir/.propulsion.lock`` with O_EXCL
and writes who holds it (host, pid, SLURM job id, start time) and a random nonce. A second job on
the same output_dir (a resubmission while the requeued job waits, a typo in two configs) finds it
and stops with one line, exit 2. (Taken at the first write, not at start: bad input in a second
job is still reported as such, and nothing is left behind by a run refused before writing.)

A lock is stale, and is taken over with a warning, when its holder cannot be running: the same
host and its pid is gone (a kill -9, a node reboot keeps the host name but not the pid), the same
SLURM job id (a requeued job is the same job: SLURM ended the previous run first), or
PROPULSION_BREAK_LOCK=1 in the environment (the user checked that the holder is dead).

At start, rank 0 leaves a file with a random name in output_dir (``View``) and every other rank
must find it: a rank that does not sees another directory under the same path (node-local disks),
where a checkpoint would miss its files. The file is removed at once.

The lock is removed when the run ends (also on an error or a preemption); an output_dir this run
created and left empty is removed with it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from propulsion_ds.errors import OutputDirError

log = logging.getLogger(__name__)

LOCK_FILE = ".propulsion.lock"
VIEW_PREFIX = ".propulsion-view-"
BREAK_LOCK_ENV = "PROPULSION_BREAK_LOCK"
TORN_GRACE_S = 30.0      # an unreadable lock younger than this may be one being written right now


@dataclass
class Lock:
    path: Path
    record: dict
    created: list = field(default_factory=list)    # directories this run made, deepest first

    def release(self) -> None:
        """Remove the lock if it is still ours, then the directories this run created, if empty."""
        try:
            if _read(self.path).get("nonce") == self.record["nonce"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        _remove_empty(self.created)


def acquire(out: Path, env=os.environ) -> Lock:
    """Rank 0: create the lock in ``out`` (made if missing), or raise OutputDirError."""
    out = Path(out)
    created = _missing_parents(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create output_dir {out} ({e.strerror or e})") from None
    path = out / LOCK_FILE
    record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nonce": secrets.token_hex(16)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            why = stale_reason(holder, path, env)
            if why is None:
                raise OutputDirError(f"output_dir {out} is in use by another run ({_describe(holder)}; "
                                     f"lock {path}): wait for it to end, or use another output_dir. If "
                                     f"that run is dead, remove {path} or set {BREAK_LOCK_ENV}=1") from None
            log.warning("output_dir %s: taking over the stale lock of %s (%s)", out, _describe(holder), why)
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise OutputDirError(f"cannot create the lock {path} ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return Lock(path, record, created)
    raise OutputDirError(f"output_dir {out}: another run took the lock {path} at the same moment")


def stale_reason(holder: dict | None, path: Path, env=os.environ) -> str | None:
    """Why the holder of a lock cannot be running any more, or None if it may be."""
    if env.get(BREAK_LOCK_ENV) == "1":
        return f"{BREAK_LOCK_ENV}=1"
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return "gone"
        return "unreadable, written by a killed run" if age > TORN_GRACE_S else None
    job = env.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"the same SLURM job {job}, requeued"
    if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
        return f"process {holder.get('pid')} is gone"
    return None


@dataclass
class View:
    """A file of rank 0's in output_dir, for the other ranks to find (then removed)."""
    path: Path
    created: list

    @classmethod
    def create(cls, out: Path) -> "View":
        out = Path(out)
        created = _missing_parents(out)
        path = out / f"{VIEW_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        except OSError as e:
            raise OutputDirError(f"cannot write into output_dir {out} ({e.strerror or e})") from None
        return cls(path, created)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _remove_empty(self.created)


def sees(out: Path, name: str) -> str | None:
    """A rank other than 0: None if it finds rank 0's ``View`` file ``name`` in ``out``, else why not."""
    path = Path(out) / name
    return None if path.is_file() else f"it finds no {path}, which rank 0 just wrote"


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                      # a zombie (killed, not yet reaped) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> dict:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    return raw


def _holder(path: Path) -> dict | None:
    try:
        return _read(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "holder unknown"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


def _remove_empty(dirs: list) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def _missing_parents(out: Path) -> list:
    """``out`` and its missing parents, deepest first: what mkdir(parents=True) is about to make."""
    missing, d = [], out.absolute()
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing
