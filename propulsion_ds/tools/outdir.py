"""The output directory of a merge or an export: written beside ``out``, renamed into place whole.

A reader (or a second run) never sees a half-written ``out``: everything goes into a temporary
sibling ``.<name>.tmp-<pid>``, which replaces ``out`` only once complete (``fsutil.replace_dir``);
an error or a kill before then leaves ``out`` as it was and removes the temp directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from propulsion_ds.errors import ExportError
from propulsion_ds.fsutil import follow_umask_tree, replace_dir


def check_export_out(out: Path, overwrite: bool, *inputs: Path) -> None:
    """ExportError unless ``out`` may be written: apart from every input, and empty or replaceable."""
    for other in inputs:
        if out.resolve() == other.resolve() or other.resolve() in out.resolve().parents \
                or out.resolve() in other.resolve().parents:
            raise ExportError(f"--out {str(out)!r} must not be, contain or lie inside the input {str(other)!r}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --overwrite")


@contextlib.contextmanager
def staged(out: Path):
    """Yield a fresh temp sibling of ``out`` to write into; it becomes ``out`` when the block
    ends, and is removed if the block raises (anything, KeyboardInterrupt too)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        follow_umask_tree(tmp)     # safetensors writes 0600; the rest of a run directory follows the umask
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
