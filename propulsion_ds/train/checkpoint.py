"""Resume checkpoints: DeepSpeed's own format, written so a kill never leaves a torn one in use.

Layout under ``root`` (output_dir/checkpoints):
    step_N/          a complete checkpoint (DeepSpeed files + rng_rank*.pt + meta.json)
    latest           text file naming the newest complete step_N, replaced atomically
    .partial/step_N  where a checkpoint is written before being renamed into place
    .partial/trash-* checkpoints being deleted (renamed out of sight first, then removed)

Why a kill at any moment is safe: a ``step_N`` directory appears under ``root`` only by one
``rename`` of a directory that already holds every rank's files (fsynced) and ``meta.json``;
it leaves ``root`` by one ``rename`` into ``.partial`` before it is deleted. So every ``step_N``
visible under ``root`` is complete, and ``latest_step`` never returns a torn one. ``latest`` is a
hint written after the rename; the newest complete directory wins if the two disagree.

Errors while writing (disk full, permissions) are agreed on by every rank, so all ranks raise the
same :class:`CheckpointError` instead of one rank dying while the others wait in a collective;
the half-written directory is removed and the previous checkpoint stays as it was.

Reading: every ``*.pt`` file of a checkpoint is first parsed with ``torch.load(weights_only=True)``
(PyTorch's restricted unpickler, with DeepSpeed's two plain state classes allowed), and only then
handed to DeepSpeed, whose own loader (0.19.8) unpickles them without that restriction.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from propulsion_ds import distributed as dist
from propulsion_ds.errors import CheckpointError  # noqa: F401

log = logging.getLogger(__name__)

META_FILE = "meta.json"
LATEST = "latest"
PARTIAL = ".partial"
TRASH_PREFIX = "trash-"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Test-only: "SECONDS" or "SECONDS:STEP" - sleep at each phase of save() (of every checkpoint, or
# of step STEP's only) so a test can kill the process, or fill the disk, inside that phase.
TEST_SLOW_ENV = "PROPULSION_TEST_SLOW_CHECKPOINT"



# --------------------------------------------------------------------------- small file helpers
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _remove_tree(path: Path, trash_root: Path, tag: str = "") -> None:
    """Take ``path`` out of sight with one rename, then delete it (a kill leaves only trash)."""
    if not path.exists():
        return
    trash_root.mkdir(parents=True, exist_ok=True)
    trash = trash_root / f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, trash)
    _fsync_dir(path.parent)
    _test_pause("trash", tag)
    shutil.rmtree(trash, ignore_errors=True)


def _free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died or timed out (gloo/NCCL/store errors)."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and re.search(
        r"gloo|nccl|Connection (closed|reset)|[Tt]imed out|[Tt]imeout|pair closure|Broken pipe|"
        r"ProcessGroup|TCPStore", str(e)) is not None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _test_pause(phase: str, tag: str) -> None:
    spec = os.environ.get(TEST_SLOW_ENV)
    if not spec:
        return
    seconds, _, only = spec.partition(":")
    if only and tag != f"step_{only}":
        return
    log.warning("test hook %s: %s phase %s, sleeping %s s", TEST_SLOW_ENV, tag, phase, seconds)
    time.sleep(float(seconds))


def agree(error: BaseException | None, what: str, root: Path, after: str = "") -> None:
    """Collective: raise the same CheckpointError on every rank if any rank failed."""
    msg = None
    if error is not None:
        msg = _one_line(error)
        if isinstance(error, OSError) and error.filename and str(error.filename) not in msg:
            msg += f" [{error.filename}]"
    msgs = [msg]
    if torch.distributed.is_initialized() and dist.world_size() > 1:
        msgs = [None] * dist.world_size()
        torch.distributed.all_gather_object(msgs, msg)
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return
    r, m = failed[0]
    free = _free_bytes(root)
    space = ""
    if free is not None:
        full = free < 1024 * 1024 or "No space left" in m or "os error 28" in m
        space = f"; {free / 1024:.0f} KiB free there" + (": the disk is full" if full else "")
    where = f"rank {r}: " if len(msgs) > 1 else ""
    raise CheckpointError(f"{what} ({where}{m}{space}){after}")


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
def save(engine, root, step: int, client_state: dict, keep_last: int, fingerprint: dict) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    Raises CheckpointError on every rank if any rank could not write its part; the previous
    checkpoints are left untouched and the half-written directory is removed.
    """
    root = Path(root)
    tag = f"step_{step}"
    partial_root = root / PARTIAL
    work = partial_root / tag
    final = root / tag
    prev = latest_step(root)
    what = f"could not write checkpoint {tag} under {root}"
    after = ""
    if prev is not None and prev != step:
        after = f"; the previous checkpoint {root / f'step_{prev}'} is intact: resume from it with --resume"

    error = None
    if dist.rank() == 0:
        try:
            shutil.rmtree(work, ignore_errors=True)
            partial_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = e
    agree(error, what, root, after)

    try:
        engine.save_checkpoint(str(partial_root), tag=tag, client_state=client_state,
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
            raise CheckpointError(f"{what} ({_one_line(e)}), and another rank stopped answering "
                                  f"({_one_line(peer)}){after}") from None
    if error is None:
        try:
            torch.save(rng_state(), work / f"rng_rank{dist.rank()}.pt")
        except Exception as e:  # noqa: BLE001
            error = e
    try:
        agree(error, what, root, after)
    except CheckpointError:
        if dist.rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _test_pause("written", tag)

    if dist.rank() == 0:
        try:
            for p in sorted(work.iterdir()):
                if p.is_file():
                    _fsync_file(p)
            meta = {"step": step, "world_size": dist.world_size(), **fingerprint}
            _write_text_atomic(work / META_FILE, json.dumps(meta, indent=2))
            _test_pause("meta", tag)
            if final.exists():
                _remove_tree(final, partial_root, tag)
            os.replace(work, final)
            _fsync_dir(root)
            _test_pause("renamed", tag)
            _write_text_atomic(root / LATEST, tag + "\n")
            _test_pause("latest", tag)
            for old in complete_steps(root)[:-keep_last]:
                _remove_tree(root / f"step_{old}", partial_root, tag)
        except Exception as e:  # noqa: BLE001
            error = e
            shutil.rmtree(work, ignore_errors=True)
    agree(error, what, root, after)
    return final


# --------------------------------------------------------------------------- load
def read_meta(root, step: int) -> dict:
    return read_step_meta(Path(root) / f"step_{step}")


def read_step_meta(step_dir) -> dict:
    path = Path(step_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    return meta


def check_fingerprint(root, step: int, fingerprint: dict) -> None:
    meta = read_meta(root, step)
    where = Path(root) / f"step_{step}"
    for key, value in fingerprint.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"checkpoint {where} was written with {key}={_short(meta[key])}, "
                f"this run has {key}={_short(value)}: use a new output_dir or the matching config "
                f"(or --overwrite to start afresh)")
    if "world_size" in meta and meta["world_size"] != dist.world_size():
        raise CheckpointError(
            f"checkpoint {where} was written by {meta['world_size']} ranks, this run has "
            f"{dist.world_size()}: ZeRO keeps optimizer state and the data position per rank; "
            f"resume with {meta['world_size']} ranks")


def _short(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed's checkpoint files hold, and numpy's RNG state."""
    allowed = [np.ndarray, np.dtype, type(np.dtype("uint32"))]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:
        allowed.append(np.core.multiarray._reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path):
    """torch.load with PyTorch's restricted unpickler; a file that needs more raises CheckpointError."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors arrive as many types
        msg = _one_line(e)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if m:
            msg = f"it references {m.group(1)}, which a checkpoint of plain tensors never does; refusing to unpickle"
        elif "weights only load failed" in msg.lower():
            msg = "not loadable with torch.load(weights_only=True)"
        raise CheckpointError(f"{path}: not a readable checkpoint file ({msg})") from None


def verify_files(root, step: int) -> None:
    """Parse every .pt file of checkpoint ``step`` with the restricted unpickler (this rank)."""
    where = Path(root) / f"step_{step}"
    files = sorted(where.glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {where} holds no .pt files")
    for f in files:
        safe_torch_load(f)


def check_resumable(root, step: int, fingerprint: dict) -> None:
    """Collective: raise the same CheckpointError on every rank unless checkpoint ``step`` was
    written for this model, these Propulsion settings and this world size, and every file in
    it parses with the restricted unpickler."""
    error = None
    try:
        check_fingerprint(root, step, fingerprint)
        verify_files(root, step)
        rng_file = Path(root) / f"step_{step}" / f"rng_rank{dist.rank()}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {rng_file.parent} lacks {rng_file.name}")
    except CheckpointError as e:
        error = e
    _agree_load(error)


def load(engine, root, step: int) -> dict:
    """Collective. Restores module vectors, optimizer, scheduler and this rank's RNG; returns client state."""
    root = Path(root)
    tag = f"step_{step}"
    error = None
    try:
        verify_files(root, step)
        rng_file = root / tag / f"rng_rank{dist.rank()}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {root / tag} lacks {rng_file.name}")
    except CheckpointError as e:
        error = e
    _agree_load(error)
    try:
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag} ({_one_line(e)})") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    set_rng_state(_load_rng(rng_file))
    return client_state or {}


def _agree_load(error: BaseException | None) -> None:
    msgs = [None if error is None else str(error)]
    if torch.distributed.is_initialized() and dist.world_size() > 1:
        msgs = [None] * dist.world_size()
        torch.distributed.all_gather_object(msgs, None if error is None else str(error))
    for m in msgs:
        if m is not None:
            raise CheckpointError(m)


def _load_rng(path: Path) -> dict:
    return safe_torch_load(path)
