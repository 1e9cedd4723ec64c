"""File-system steps that keep readers from ever seeing a half-written file or directory.

Each one is a write to a temporary name followed by one ``rename``: a kill at any moment leaves
the old file or the new one in place, plus at most a temp file or trash directory to clean up.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path
from typing import Callable


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # Best effort: some file systems refuse to open or fsync a directory; the rename itself
    # is atomic either way, only its durability across a power loss depends on this.
    try:
        fsync_file(path)
    except OSError:
        pass


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: Path, mask: int | None = None) -> None:
    """Give the regular file ``path`` the mode a plain ``open(path, "w")`` would have had,
    ``0o666 & ~umask``: some writers (safetensors' ``save_file``, anything going through
    ``tempfile``) create 0600 files, which other users of a shared run directory cannot read."""
    mode = 0o666 & ~(umask() if mask is None else mask)
    if stat.S_IMODE(os.stat(path).st_mode) != mode:
        os.chmod(path, mode)


def follow_umask_tree(root: Path) -> None:
    """``follow_umask`` on every regular file under ``root`` (links are left alone)."""
    mask = umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                follow_umask(p, mask)


def write_atomic(path: Path, write: Callable[[Path], object], tmp: Path | None = None) -> None:
    """``write(tmp)``, fsync it, rename it over ``path``. A failed write (disk full) removes the
    temp file and leaves the old ``path`` as it was. ``tmp`` defaults to ``<name>.tmp<pid>``.
    The file gets the umask's mode whatever ``write`` created it with (``follow_umask``)."""
    path = Path(path)
    tmp = tmp or path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        follow_umask(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def move_aside(path: Path, trash_root: Path, prefix: str = "trash-") -> Path:
    """Take ``path`` out of sight with one rename into ``trash_root`` (same file system) and
    return where it went; deleting it there can then take as long as it likes (a kill mid-delete
    leaves only trash, never a half-deleted ``path``)."""
    trash_root.mkdir(parents=True, exist_ok=True)
    trash = trash_root / f"{prefix}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    return trash


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp directory ``tmp`` into place: ``out`` is never seen half-written."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
