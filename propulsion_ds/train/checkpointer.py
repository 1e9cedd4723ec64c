"""The checkpointer: owns output_dir and everything a run writes there that a resume depends on.

One object, handed to the recipe, decides:
- at start: resume or start afresh (never clobbering a run), and tidying what a kill left;
- what a resume must match (the fingerprint written into every checkpoint's meta.json);
- when to save (``save(step)`` checks checkpoint.every_steps itself; ``last_step=True`` at the end
  of a run, ``force=True`` on preemption), and the adapter/ that follows every save;
- the last good checkpoint, named in every error that stops a run, and the FINISHED marker.

The on-disk format and the kill-safe save are ``checkpoint.py``'s; the trainer is Stateful
(``state_dict``/``load_state_dict``): what it returns travels in the checkpoint as client state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from propulsion_ds import distributed as dist
from propulsion_ds.collective import agree_as_is, rank0_write
from propulsion_ds.config.paths import expand_data_paths
from propulsion_ds.errors import CheckpointError, OutputDirError
from propulsion_ds.fsutil import move_aside, write_text_atomic
from propulsion_ds.method.gather import gathered, trained_biases
from propulsion_ds.method.adapter import save_adapter
from propulsion_ds.method.propulsion import DELTA_NAME
from propulsion_ds.train import checkpoint, elastic, outdir_lock
from propulsion_ds.train.safe_load import safe_torch_load

log = logging.getLogger(__name__)

FINISHED_MARKER = "FINISHED"
# What a run writes into output_dir: --overwrite (or a fresh start over a run that died before
# its first checkpoint) removes exactly these, nothing else a user keeps there.
TRASH_PREFIX = ".removing-"    # a hidden sibling: one rename, then a delete a kill may interrupt
RUN_OUTPUTS = ("checkpoints", "adapter", "tensorboard", "metrics.jsonl", "config.json", FINISHED_MARKER)


class Checkpointer:
    def __init__(self, cfg, overwrite: bool = False):
        self.cfg, self.overwrite = cfg, overwrite
        self.out = Path(cfg.output_dir)
        self.root = self.out / "checkpoints"
        self.every, self.keep_last = cfg.checkpoint.every_steps, cfg.checkpoint.keep_last
        self.resume_step: int | None = None
        self.lock: outdir_lock.Lock | None = None
        self.elastic = False            # resuming on another world size or split: from elastic.safetensors
        self.engine = self.model = self.state = None
        self.fingerprint: dict = {}
        self.changes: dict = {}         # {setting: (old, new)} a resume changes, for the engine to apply
        self._before_save: Callable[[], None] = lambda: None
        self._after_adapter: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ start
    def start(self) -> int | None:
        """Collective, first thing after the process group forms: check that every rank sees the
        same output_dir, and let rank 0 alone decide resume-or-fresh for all: the step to resume
        from, or None. Each refusal is one line on every rank. Nothing stays written: output_dir's
        lock is taken by ``prepare``, before the run's first write."""
        rank = dist.rank()
        if dist.world_size() > 1:
            self._check_same_output_dir(rank)
        decision = None
        if rank == 0:
            try:
                decision = ("ok", self.decide())
            except OutputDirError as e:
                decision = ("error", str(e))
        kind, value = _broadcast(decision)
        if kind == "error":
            raise OutputDirError(value)
        self.resume_step = value
        return value

    def _check_same_output_dir(self, rank: int) -> None:
        """Collective: rank 0 leaves a file of its own in output_dir, every rank must read it."""
        error = view = None
        if rank == 0:
            try:
                view = outdir_lock.View.create(self.out)
            except OutputDirError as e:
                error = e
        agree_as_is(error, OutputDirError)
        name = _broadcast(None if view is None else view.path.name)
        why = None if rank == 0 else outdir_lock.sees(self.out, name)
        try:
            agree_as_is(None if why is None else OutputDirError(
                f"rank {rank} does not see the output_dir {self.out} of rank 0 ({why}): output_dir must "
                f"be one directory every rank shares (a shared file system, not node-local disks)"),
                OutputDirError)
        finally:
            if view is not None:
                view.remove()
            # No rank leaves before rank 0's file is gone: torchrun stops the other workers as soon
            # as one exits with an error, which would kill rank 0 mid-removal.
            dist.barrier()

    def close(self) -> None:
        """The run is over (finished, failed or preempted): release output_dir's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def decide(self) -> int | None:
        """Rank 0: the step to resume from, or None for a fresh start; before anything heavy."""
        resume, step = self.cfg.resume, checkpoint.latest_step(self.root)
        finished = (self.out / FINISHED_MARKER).is_file()
        if resume is True and self.overwrite:
            raise OutputDirError("--resume and --overwrite contradict each other: pass one of them")
        config = self.out / "config.json"
        if config.is_file() and not _is_run_config(config):
            raise OutputDirError(f"output_dir {self.out} holds a config.json that is not a propulsion run "
                                 f"config (a model directory?): choose another output_dir")
        if resume is True and step is None:
            raise OutputDirError(f"--resume: no complete checkpoint under {self.root}")
        if resume in (True, "auto") and step is not None:
            self.resume_step = step
            return step
        if self.overwrite:
            return None
        adapter = self.out / "adapter" / "propulsion.safetensors"
        if finished or step is not None or adapter.is_file():
            what = ("a finished run" if finished else f"checkpoints up to step {step}" if step is not None
                    else f"a trained adapter ({adapter})")
            raise OutputDirError(f"output_dir {self.out} already holds {what}: pass --resume to continue "
                                 f"or --overwrite to start again")
        return None

    def bind(self, engine, model, state, fingerprint: dict, before_save: Callable[[], None] | None = None,
             after_adapter: Callable[[], None] | None = None) -> None:
        """What a save writes: the engine's files, ``state.state_dict()`` as client state, the
        adapter of ``model``; ``before_save``/``after_adapter`` let the metrics sink check and flush."""
        self.engine, self.model, self.state, self.fingerprint = engine, model, state, fingerprint
        self._before_save = before_save or self._before_save
        self._after_adapter = after_adapter or self._after_adapter

    def check_resumable(self, fingerprint: dict) -> None:
        """Collective: same model, method and trajectory settings, files readable with the
        restricted unpickler; checked before anything in output_dir is touched."""
        if self.resume_step is not None:
            check_resumable(self.root, self.resume_step, fingerprint)
            self.elastic = is_elastic(checkpoint.read_meta(self.root, self.resume_step), fingerprint)

    def prepare(self, max_steps: int) -> None:
        """Collective, after every rank has decided resume-or-not: rank 0 takes output_dir's lock,
        then clears or tidies. A second run on this output_dir is refused here, before it writes."""
        resume_step = self.resume_step
        error = None
        if dist.rank() == 0:
            try:
                self.lock = outdir_lock.acquire(self.out)
                latest = checkpoint.latest_step(self.root)
                if latest != resume_step and not (resume_step is None and self.overwrite):
                    raise OutputDirError(f"output_dir {self.out} changed while this run was starting (another "
                                         f"run wrote checkpoints there): start this run again")
            except OutputDirError as e:
                error = e
        agree_as_is(error, OutputDirError)

        def tidy():
            for trash in self.out.glob(TRASH_PREFIX + "*"):      # left by a kill mid-clear
                shutil.rmtree(trash, ignore_errors=True)
            if resume_step is None:
                self._clear_previous_run()
            else:
                checkpoint.clean_partial(self.root)
                for tmp in (self.out / "adapter").glob("*.tmp"):
                    tmp.unlink(missing_ok=True)
                if max_steps > resume_step:
                    (self.out / FINISHED_MARKER).unlink(missing_ok=True)
        rank0_write(tidy, f"cannot prepare output_dir {self.out}", self.out)

    def _clear_previous_run(self) -> None:
        # A fresh start: --overwrite, or leftovers of a run that died before its first
        # checkpoint. Stale checkpoints must go, or `latest` could point into the old run.
        stale = [n for n in RUN_OUTPUTS if (self.out / n).exists()]
        if stale:
            log.info("output_dir %s: removing the previous run's %s", self.out, ", ".join(stale))
        for name in stale:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(move_aside(path, self.out, TRASH_PREFIX), ignore_errors=True)
            else:
                path.unlink()

    def load(self) -> int:
        """Collective: restore the engine and ``state`` from the checkpoint decided on; its step."""
        step = self.resume_step
        check_fingerprint(self.root, step, self.fingerprint)
        self.changes = applied_changes(self.root, step, self.fingerprint)
        if self.elastic:
            self.state.load_state_dict(self._load_elastic(step))
        else:
            self.state.load_state_dict(checkpoint.load(self.engine, self.root, step))
        log.info("resumed from %s at step %d", self.root / f"step_{step}", step)
        return step

    def _load_elastic(self, step: int) -> dict:
        """Collective: the world-size-independent state into this world's partitions."""
        where = self.root / f"step_{step}"
        old = _split(checkpoint.read_meta(self.root, step))
        error = loaded = None
        try:
            rng_file = checkpoint.check_files(self.root, step, own_rng=False)
            loaded = elastic.read(where / elastic.FILE)
        except CheckpointError as e:
            error = e
        agree_as_is(error)
        log.info("elastic resume: checkpoint written as %s, this run is %s", _show(old), _show(_split(self.fingerprint)))
        trainer = elastic.load(self.engine, self.model, *loaded)
        checkpoint.set_rng_state(safe_torch_load(rng_file))
        return trainer

    # ------------------------------------------------------------------ during the run
    def save(self, step: int, last_step: bool = False, force: bool = False) -> bool:
        """Collective. Checkpoint ``step`` when due (every checkpoint.every_steps), at the run's
        last step, or when forced (preemption); each save is followed by adapter/. At the last
        step of a run resumed at its end the checkpoint exists: only the adapter is rewritten.
        Returns whether a checkpoint was written."""
        if last_step and not force and checkpoint.latest_step(self.root) == step:
            self._before_save()
            self.write_adapter(step)
            return False
        if not (force or last_step or step % self.every == 0):
            return False
        self._before_save()
        state = self.state.state_dict()
        tensors, meta = elastic.gather(self.engine, self.model, state)       # collective
        checkpoint.save(self.engine, self.root, step, state, self.keep_last, self.fingerprint,
                        extra={elastic.FILE: lambda path: elastic.write(path, tensors, meta)})
        self.write_adapter(step)
        return True

    def write_adapter(self, step: int) -> torch.Tensor:
        """Collective; rank 0 writes adapter/ (temp file + rename, so never torn). Returns the delta."""
        delta = full_delta(self.model)
        biases = trained_biases(self.model)              # collective; {} without train_bias
        out = self.out
        prompt = {"format": self.cfg.data.format, "template": self.cfg.data.template}   # for launch/generate.py
        rank0_write(lambda: save_adapter(self.model, out / "adapter", delta=delta, biases=biases, prompt=prompt),
                    f"could not write the adapter under {out / 'adapter'}", out,
                    f"; checkpoint step_{step} is complete: resume with --resume",
                    # safetensors reports a full disk in its own exception type
                    catch=(Exception,))
        self._after_adapter()
        return delta

    def finish(self, step: int) -> None:
        """Collective: the FINISHED marker, the last thing a completed run writes."""
        marker = self.out / FINISHED_MARKER
        rank0_write(lambda: write_text_atomic(marker, f"{step}\n"), f"cannot write {marker}", self.out)

    def last_good(self) -> str:
        """The newest complete checkpoint's directory, or "none": what every stop line names."""
        last = checkpoint.latest_step(self.root)
        return str(self.root / f"step_{last}") if last is not None else "none"


def _broadcast(obj):
    """Collective: rank 0's ``obj`` on every rank."""
    if dist.world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json this trainer wrote (only those are ever replaced)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and {"model", "propulsion", "train", "output_dir"} <= set(raw)


# --------------------------------------------------------------------------- fingerprint
# A resume may change these on purpose: they take effect from the resumed step, logged once.
SETTINGS = ("train.lr", "train.weight_decay", "train.max_grad_norm", "train.max_steps", "train.epochs",
            "train.schedule", "train.warmup_steps", "eval.every_steps", "checkpoint.every_steps")
# Applied and logged by the engine wrapper itself (DSEngine.apply_settings), from what it restored.
ENGINE_LOGS = ("train.lr", "train.weight_decay", "train.max_grad_norm")
# How one global batch is split: any split of the same global batch resumes (elastic).
SPLIT = ("train.micro_batch_size", "train.gradient_accumulation_steps", "world_size")
GLOBAL_BATCH = "train.global_batch"


def fingerprint(cfg, trainable: int, n_targets: int, world: int = 1, tokenizer=None) -> dict:
    """What a checkpoint's meta.json records of the run. Collective when ``tokenizer`` is given:
    rank 0 hashes the data files' contents and broadcasts the digest.

    Top-level keys define the trajectory (the data order, the objective, the numerics): a resume
    under another value is refused naming the key, a config field. The split of the global batch
    (``SPLIT``) is free as long as its product is unchanged; ``settings`` may change on resume.
    """
    t, d = cfg.train, cfg.data
    fp = {"model": cfg.model.name_or_path, "propulsion": cfg.propulsion.to_dict(),
          "trainable": trainable, "targets": n_targets,
          "model.dtype": cfg.model.dtype, "model.attn_implementation": cfg.model.attn_implementation,
          "train.seed": t.seed, "data.train": data_files(d.train), "data.format": d.format,
          "data.max_length": d.max_length, "data.packing": d.packing, "data.template": d.template,
          "data.text_field": d.text_field, "data.eval": None if d.eval is None else data_files(d.eval),
          "data.eval_fraction": d.eval_fraction, "eval.answer_format": cfg.eval.answer_format,
          GLOBAL_BATCH: t.micro_batch_size * t.gradient_accumulation_steps * world,
          "train.micro_batch_size": t.micro_batch_size,
          "train.gradient_accumulation_steps": t.gradient_accumulation_steps, "world_size": world,
          "settings": {key: _field(cfg, key) for key in SETTINGS}}
    if tokenizer is not None:
        from propulsion_ds.data.cache import tokenizer_fingerprint

        fp["tokenizer"] = _digest(tokenizer_fingerprint(tokenizer))
        fp["data.contents"] = _broadcast(_contents(cfg) if dist.rank() == 0 else None)
    return fp


def check_fingerprint(root, step: int, fingerprint: dict) -> None:
    """Refuse a resume that would not continue the checkpoint's trajectory, naming the field."""
    meta = checkpoint.read_meta(root, step)
    where = Path(root) / f"step_{step}"
    for key, value in fingerprint.items():
        if key in SPLIT or key in (GLOBAL_BATCH, "settings"):
            continue
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"checkpoint {where} was written with {key}={_short(meta[key])}, "
                f"this run has {key}={_short(value)}: use a new output_dir or the matching config "
                f"(or --overwrite to start afresh)")
    old, new = _split(meta), _split(fingerprint)
    if None not in old.values() and None not in new.values() and _product(old) != _product(new):
        changed = [k for k in SPLIT if old[k] != new[k]]
        raise CheckpointError(
            f"checkpoint {where} was written with a global batch of {_product(old)} samples ({_show(old)}), "
            f"this run has {_product(new)} ({_show(new)}): {' and '.join(changed)} changed the product; "
            f"resume with any split whose product is {_product(old)} (or use a new output_dir, or "
            f"--overwrite to start afresh)")


def applied_changes(root, step: int, fingerprint: dict) -> dict:
    """{setting: (old, new)} of the settings this resume changes (logged once, then applied)."""
    old = checkpoint.read_meta(root, step).get("settings") or {}
    new = fingerprint.get("settings") or {}
    changes = {k: (old[k], new[k]) for k in SETTINGS if k in old and k in new and old[k] != new[k]}
    for key, (a, b) in changes.items():
        if key not in ENGINE_LOGS:
            log.info("step %d: %s %s -> %s", step, key, a, b)
    return changes


def is_elastic(meta: dict, fingerprint: dict) -> bool:
    """Whether checkpoint ``meta`` was written by another world size or split than this run's."""
    old, new = _split(meta), _split(fingerprint)
    return None not in old.values() and None not in new.values() and old != new


def _split(meta: dict) -> dict:
    return {k: meta.get(k) for k in SPLIT}


def _product(split: dict) -> int:
    return split["train.micro_batch_size"] * split["world_size"] * split["train.gradient_accumulation_steps"]


def _show(split: dict) -> str:
    return (f"train.micro_batch_size={split['train.micro_batch_size']} x {split['world_size']} ranks x "
            f"train.gradient_accumulation_steps={split['train.gradient_accumulation_steps']}")


def _field(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _contents(cfg) -> str:
    """One digest of the contents of every data file (a file rewritten at the same size counts).
    The hashes are the data cache's own (``data.cache.content_hash``): kept beside the cache and
    reused while a file's stat is unchanged, so a restart does not re-read terabytes."""
    from propulsion_ds.data.cache import HASH_DIR, content_hash
    from propulsion_ds.train.run_data import data_cache_dir

    d = cfg.data
    files = list(expand_data_paths(d.train)) + ([] if d.eval is None else list(expand_data_paths(d.eval)))
    hash_dir = os.path.join(data_cache_dir(cfg), HASH_DIR)
    os.makedirs(hash_dir, exist_ok=True)
    return _digest([content_hash(f, hash_dir) for f in files if os.path.isfile(f)])


def check_resumable(root, step: int, fingerprint: dict) -> None:
    """Collective: raise the same CheckpointError on every rank unless checkpoint ``step`` was
    written for this model, these Propulsion settings and this trajectory, and every file in it
    parses with the restricted unpickler (and, written by another split, holds the elastic state)."""
    error = None
    try:
        check_fingerprint(root, step, fingerprint)
        is_other_split = is_elastic(checkpoint.read_meta(root, step), fingerprint)
        checkpoint.check_files(Path(root), step, own_rng=not is_other_split)
        if is_other_split and not (Path(root) / f"step_{step}" / elastic.FILE).is_file():
            elastic.read(Path(root) / f"step_{step}" / elastic.FILE)          # raises, saying why
    except CheckpointError as e:
        error = e
    agree_as_is(error)


def _short(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def data_files(spec) -> list:
    """[path, size] of every data file a spec names: a changed file changes the rows."""
    return [[os.path.abspath(f), os.path.getsize(f) if os.path.isfile(f) else None]
            for f in expand_data_paths(spec)]


# --------------------------------------------------------------------------- the adapter
def full_delta(model) -> torch.Tensor:
    """Collective: the vectors in fp32, DeepSpeed's master copy where it keeps one."""
    from deepspeed.utils import safe_get_full_fp32_param

    p = getattr(model, DELTA_NAME)
    full = safe_get_full_fp32_param(p)
    if full is None:
        with gathered([p]):
            full = p.detach().float().clone()
    return full.float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
