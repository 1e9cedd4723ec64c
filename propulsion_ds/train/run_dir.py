"""The output directory's policy: resume or start fresh, never clobber a run, tidy after a kill."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from propulsion_ds.collective import rank0_write
from propulsion_ds.errors import OutputDirError
from propulsion_ds.fsutil import move_aside, write_text_atomic
from propulsion_ds.train import checkpoint

log = logging.getLogger(__name__)

FINISHED_MARKER = "FINISHED"
# What a run writes into output_dir: --overwrite (or a fresh start over a run that died before
# its first checkpoint) removes exactly these, nothing else a user keeps there.
TRASH_PREFIX = ".removing-"    # a hidden sibling: one rename, then a delete a kill may interrupt
RUN_OUTPUTS = ("checkpoints", "adapter", "tensorboard", "metrics.jsonl", "config.json", FINISHED_MARKER)


class RunDir:
    def __init__(self, out):
        self.out = Path(out)
        self.ckpt_root = self.out / "checkpoints"

    def decide(self, resume, overwrite: bool) -> int | None:
        """The step to resume from, or None for a fresh start; decided before anything heavy."""
        step = checkpoint.latest_step(self.ckpt_root)
        finished = (self.out / FINISHED_MARKER).is_file()
        if resume is True and overwrite:
            raise OutputDirError("--resume and --overwrite contradict each other: pass one of them")
        config = self.out / "config.json"
        if config.is_file() and not _is_run_config(config):
            raise OutputDirError(f"output_dir {self.out} holds a config.json that is not a propulsion run "
                                 f"config (a model directory?): choose another output_dir")
        if resume is True and step is None:
            raise OutputDirError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        if resume in (True, "auto") and step is not None:
            return step
        if overwrite:
            return None
        adapter = self.out / "adapter" / "propulsion.safetensors"
        if finished or step is not None or adapter.is_file():
            what = ("a finished run" if finished else f"checkpoints up to step {step}" if step is not None
                    else f"a trained adapter ({adapter})")
            raise OutputDirError(f"output_dir {self.out} already holds {what}: pass --resume to continue "
                                 f"or --overwrite to start again")
        return None

    def prepare(self, resume_step: int | None, max_steps: int) -> None:
        """Collective, after every rank has decided resume-or-not: rank 0 clears or tidies."""
        def tidy():
            for trash in self.out.glob(TRASH_PREFIX + "*"):      # left by a kill mid-clear
                shutil.rmtree(trash, ignore_errors=True)
            if resume_step is None:
                self._clear_previous_run()
            else:
                checkpoint.clean_partial(self.ckpt_root)
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

    def finish(self, step: int) -> None:
        """Collective: the FINISHED marker, the last thing a completed run writes."""
        marker = self.out / FINISHED_MARKER
        rank0_write(lambda: write_text_atomic(marker, f"{step}\n"), f"cannot write {marker}", self.out)

    def last_good(self) -> str:
        last = checkpoint.latest_step(self.ckpt_root)
        return str(self.ckpt_root / f"step_{last}") if last is not None else "none"


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json this trainer wrote (only those are ever replaced)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and {"model", "propulsion", "train", "output_dir"} <= set(raw)
