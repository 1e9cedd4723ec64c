"""Resume checkpoints: DeepSpeed's own format, written so a kill never leaves a torn one in use.

Layout under ``root`` (output_dir/checkpoints):
    step_N/          a complete checkpoint (DeepSpeed files + rng_rank*.pt + meta.json)
    latest           text file naming the newest complete step_N, replaced atomically
    .partial/step_N  where a checkpoint is written before being renamed into place
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist

META_FILE = "meta.json"
LATEST = "latest"
PARTIAL = ".partial"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message says which and why."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def save(engine, root, step: int, client_state: dict, keep_last: int, fingerprint: dict) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    tag = f"step_{step}"
    partial_root = root / PARTIAL
    if dist.rank() == 0:
        shutil.rmtree(partial_root / tag, ignore_errors=True)
        partial_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(partial_root), tag=tag, client_state=client_state,
                           save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), partial_root / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    final = root / tag
    if dist.rank() == 0:
        meta = {"step": step, "world_size": dist.world_size(), **fingerprint}
        _write_text_atomic(partial_root / tag / META_FILE, json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial_root / tag, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, tag + "\n")
        for old in complete_steps(root)[:-keep_last]:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()
    return final


def read_meta(root, step: int) -> dict:
    path = Path(root) / f"step_{step}" / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None


def check_fingerprint(root, step: int, fingerprint: dict) -> None:
    meta = read_meta(root, step)
    for key, value in fingerprint.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"checkpoint {Path(root) / f'step_{step}'} was written with {key}={meta[key]!r}, "
                f"this run has {key}={value!r}: use a new output_dir or the matching config")


def load(engine, root, step: int) -> dict:
    """Collective. Restores module vectors, optimizer, scheduler and this rank's RNG; returns client state."""
    root = Path(root)
    tag = f"step_{step}"
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(_load_rng(rng_file))
    return client_state or {}


def _load_rng(path: Path) -> dict:
    # numpy's RNG state holds an ndarray; allow exactly the types it needs, nothing else.
    with torch.serialization.safe_globals([np.ndarray, np.dtype, np.core.multiarray._reconstruct,
                                           type(np.dtype("uint32"))]):
        return torch.load(path, weights_only=True)
