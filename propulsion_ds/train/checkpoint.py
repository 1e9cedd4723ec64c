"""Resume checkpoints: DeepSpeed's own format, written so a kill never leaves a torn one in use.

Layout under ``root`` (output_dir/checkpoints):
    step_N/          a complete checkpoint (DeepSpeed files + rng_rank*.pt + meta.json)
    latest           text file naming the newest complete step_N, replaced atomically
    .partial/step_N  where a checkpoint is written before being renamed into place
    .partial/trash-* checkpoints being deleted (renamed out of sight first, then removed)
After a save .partial is empty: DeepSpeed's copy of its zero_to_fp32.py (written into the
directory it saves under) is removed with the rest.

Why a kill at any moment is safe: a ``step_N`` directory appears under ``root`` only by one
``rename`` of a directory that already holds every rank's files (fsynced) and ``meta.json``;
it leaves ``root`` by one ``rename`` into ``.partial`` before it is deleted. So every ``step_N``
visible under ``root`` is complete, and ``latest_step`` never returns a torn one. ``latest`` is a
hint written after the rename; the newest complete directory wins if the two disagree.

Errors while writing (disk full, permissions) are agreed on by every rank, so all ranks raise the
same :class:`CheckpointError` instead of one rank dying while the others wait in a collective;
the half-written directory is removed and the previous checkpoint stays as it was.

Reading: every ``*.pt`` file of a checkpoint is first parsed with the restricted unpickler
(``safe_load.safe_torch_load``), and only then handed to DeepSpeed, whose own loader (0.19.8)
unpickles them without that restriction.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from propulsion_ds import collective, fsutil
from propulsion_ds import distributed as dist
from propulsion_ds.distributed import is_peer_failure
from propulsion_ds.errors import CheckpointError
from propulsion_ds.train.safe_load import safe_torch_load

META_FILE = "meta.json"
LATEST = "latest"
PARTIAL = ".partial"
TRASH_PREFIX = "trash-"
STEP_DIR = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- rng
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- listing
def complete_steps(root) -> list[int]:
    """Steps of complete checkpoints (meta.json is written last inside), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / META_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(root) -> int | None:
    """The step named by ``latest`` if that checkpoint is complete, else the newest complete one."""
    root = Path(root)
    steps = complete_steps(root)
    pointer = root / LATEST
    if pointer.is_file():
        m = STEP_DIR.match(pointer.read_text().strip())
        if m and int(m.group(1)) in steps and int(m.group(1)) == max(steps):
            return int(m.group(1))
    return steps[-1] if steps else None


def clean_partial(root) -> None:
    """Remove what a killed save left behind (.partial, stray temp files). Rank 0, no other writer."""
    root = Path(root)
    shutil.rmtree(root / PARTIAL, ignore_errors=True)
    if root.is_dir():
        for p in root.glob(f"{LATEST}.tmp*"):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- save
@dataclass
class _Save:
    """Where one save writes, and what its error line says."""
    root: Path
    step: int

    def __post_init__(self):
        self.tag = f"step_{self.step}"
        self.partial = self.root / PARTIAL
        self.work = self.partial / self.tag
        self.final = self.root / self.tag
        self.what = f"could not write checkpoint {self.tag} under {self.root}"
        prev = latest_step(self.root)
        self.after = "" if prev is None or prev == self.step else (
            f"; the previous checkpoint {self.root / f'step_{prev}'} is intact: resume from it with --resume")


def save(engine, root, step: int, client_state: dict, keep_last: int, fingerprint: dict,
         extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    Raises CheckpointError on every rank if any rank could not write its part; the previous
    checkpoints are left untouched and the half-written directory is removed.

    The phases, each a function of its own: ``_prepare`` (rank 0), ``_write_parts`` (every
    rank: DeepSpeed's files and its RNG state), then rank 0 alone ``_seal`` (fsync, meta.json),
    ``_rename`` (into place), ``_point_latest`` and ``_prune`` (``_trash`` per old checkpoint).
    A phase function returning is that phase's boundary; each takes the ``_Save`` first, so the
    fault tests (tests/fault_entry.py) can wrap them all alike and kill a run there.
    """
    s = _Save(Path(root), step)
    collective.rank0_write(lambda: _prepare(s), s.what, s.root, s.after)
    _write_parts(s, engine, client_state, extra or {})
    collective.rank0_write(lambda: _publish(s, keep_last, fingerprint), s.what, s.root, s.after,
                           catch=(Exception,))
    return s.final


def _prepare(s: _Save) -> None:
    shutil.rmtree(s.work, ignore_errors=True)
    s.partial.mkdir(parents=True, exist_ok=True)


def _write_parts(s: _Save, engine, client_state: dict, extra: dict | None = None) -> None:
    """Collective: every rank writes its DeepSpeed files and RNG state into ``s.work``; rank 0
    also each of ``extra`` ({file name: writer(path)})."""
    error = None
    try:
        engine.save_checkpoint(str(s.partial), tag=s.tag, client_state=client_state,
                               save_latest=False, exclude_frozen_parameters=True)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        error = e
        # DeepSpeed's save ends in a barrier the other ranks are waiting in: meet them there.
        # If that fails too (a peer is gone), the first error is the one worth reporting.
        try:
            dist.barrier()
        except Exception as peer:  # noqa: BLE001
            if is_peer_failure(e):
                raise e from None
            raise CheckpointError(f"{s.what} ({collective.one_line(e)}), and another rank stopped "
                                  f"answering ({collective.one_line(peer)}){s.after}") from None
    if error is None:
        try:
            torch.save(rng_state(), s.work / f"rng_rank{dist.rank()}.pt")
            if dist.rank() == 0:
                for name, writer in (extra or {}).items():
                    writer(s.work / name)
        except Exception as e:  # noqa: BLE001
            error = e
    try:
        collective.agree(error, s.what, s.root, s.after)
    except CheckpointError:
        if dist.rank() == 0:
            shutil.rmtree(s.work, ignore_errors=True)
        raise


def _publish(s: _Save, keep_last: int, fingerprint: dict) -> None:
    """Rank 0: make the written checkpoint visible; on failure remove its half-done directory."""
    try:
        _tidy(s)    # first: the space it frees is there before the checkpoint counts as saved
        _seal(s, fingerprint)
        _rename(s)
        _point_latest(s)
        _prune(s, keep_last)
    except Exception:
        shutil.rmtree(s.work, ignore_errors=True)
        raise


def _seal(s: _Save, fingerprint: dict) -> None:
    _check_every_rank_wrote(s, dist.world_size())
    for p in sorted(s.work.iterdir()):
        if p.is_file():
            fsutil.fsync_file(p)
    meta = {"step": s.step, "world_size": dist.world_size(), **fingerprint}
    fsutil.write_text_atomic(s.work / META_FILE, json.dumps(meta, indent=2))


def _check_every_rank_wrote(s: _Save, world: int) -> None:
    """Seal only a checkpoint holding every rank's files: with output_dir on node-local disks the
    other nodes' files land elsewhere, and a checkpoint sealed without them cannot be resumed."""
    names = {p.name for p in s.work.iterdir()}
    per_rank = [n for n in names if n.startswith("zero_pp_rank_0_")]
    missing = {r: [n for n in [f"rng_rank{r}.pt"] + [m.replace("zero_pp_rank_0_", f"zero_pp_rank_{r}_", 1)
                                                       for m in per_rank] if n not in names]
               for r in range(world)}
    missing = {r: m for r, m in missing.items() if m}
    if missing:
        r, files = next(iter(missing.items()))
        raise CheckpointError(f"checkpoint {s.tag} lacks the files of rank(s) {sorted(missing)} (rank {r}: "
                              f"{', '.join(files)}): every rank must write into the same output_dir "
                              f"(a shared file system, not node-local disks)")


def _tidy(s: _Save) -> None:
    """DeepSpeed copies its zero_to_fp32.py into the directory it saves under (.partial)."""
    for p in s.partial.glob("zero_to_*.py"):
        p.unlink(missing_ok=True)


def _rename(s: _Save) -> None:
    if s.final.exists():
        _discard(s, s.final)
    os.replace(s.work, s.final)
    fsutil.fsync_dir(s.root)


def _point_latest(s: _Save) -> None:
    fsutil.write_text_atomic(s.root / LATEST, s.tag + "\n")


def _prune(s: _Save, keep_last: int) -> None:
    for old in complete_steps(s.root)[:-keep_last]:
        _discard(s, s.root / f"step_{old}")


def _discard(s: _Save, path: Path) -> None:
    shutil.rmtree(_trash(s, path), ignore_errors=True)


def _trash(s: _Save, path: Path) -> Path:
    """Rename ``path`` out of sight into .partial (where deleting it can be interrupted)."""
    return fsutil.move_aside(path, s.partial, TRASH_PREFIX)


# --------------------------------------------------------------------------- load
def read_meta(root, step: int) -> dict:
    return read_step_meta(Path(root) / f"step_{step}")


def read_step_meta(step_dir) -> dict:
    path = Path(step_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({collective.one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    return meta


def verify_files(root, step: int) -> None:
    """Parse every .pt file of checkpoint ``step`` with the restricted unpickler (this rank)."""
    where = Path(root) / f"step_{step}"
    files = sorted(where.glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {where} holds no .pt files")
    for f in files:
        safe_torch_load(f)


def check_files(root: Path, step: int, own_rng: bool = True) -> Path:
    """This rank's part of checkpoint ``step`` parses safely; returns its RNG file. Without
    ``own_rng`` (an elastic resume on more ranks than wrote it) a rank may take rank 0's."""
    verify_files(root, step)
    rng_file = root / f"step_{step}" / f"rng_rank{dist.rank()}.pt"
    if not own_rng and not rng_file.is_file():
        rng_file = rng_file.with_name("rng_rank0.pt")
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {rng_file.parent} lacks {rng_file.name}")
    return rng_file


def load(engine, root, step: int) -> dict:
    """Collective. Restores module vectors, optimizer, scheduler and this rank's RNG; returns client state."""
    root = Path(root)
    tag = f"step_{step}"
    error = rng_file = None
    try:
        rng_file = check_files(root, step)
    except CheckpointError as e:
        error = e
    collective.agree_as_is(error)
    try:
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag} ({collective.one_line(e)})") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    set_rng_state(safe_torch_load(rng_file))
    return client_state or {}
