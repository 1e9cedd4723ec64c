"""Elastic resume: a checkpoint continues on another number of ranks, or another split of the
same global batch, on the same trajectory (propulsion_ds.train.elastic).

One uninterrupted run (2 ranks x micro-batch 2) against two interrupted ones, each killed inside
its step-3 checkpoint (tests/fault_entry.py holds the save open) and resumed on the other world
size with the accumulation changed to keep the global batch of 4: 2 -> 1 ranks (accumulation 2)
and 1 -> 2 ranks. ZeRO-3 with every tensor partitioned (the resumed rank 0 holds another slice of
each vector than the one that wrote it), warm-up and cosine (the LR schedule resumes too). Each
resumed adapter and each step's loss must match the uninterrupted run within the tolerance of the
split-invariance test (tests/test_arithmetic.py). A resume that changes the global batch is refused
in one line naming the factor; DeepSpeed's zero_to_fp32.py leaves nothing in checkpoints/.partial.
"""
from __future__ import annotations

import json

import pytest

from helpers import (ROOT, TINY_CONFIG, kill_group, read_metrics, run_train, start_train, stderr_lines, tail,
                     train_records, wait_for)
from test_arithmetic import SPLIT_TOL, z_minus_1, zero3_partitioned

pytestmark = pytest.mark.slow

FAULT_ENTRY = ROOT / "tests" / "fault_entry.py"
STEPS, KILL_AT = 6, 3
SPLITS = {2: ["train.micro_batch_size=2", "train.gradient_accumulation_steps=1"],     # ranks -> split
          1: ["train.micro_batch_size=2", "train.gradient_accumulation_steps=2"]}


def _args(out, ds, nproc, extra=()):
    sets = [f"output_dir={out}", f"deepspeed={ds}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={KILL_AT}",
            "train.schedule=cosine", "train.warmup_steps=2", "train.lr=0.01", "data.max_length=32",
            "data.eval_fraction=0", "eval.every_steps=100", "model.dtype=fp32", *SPLITS[nproc], *extra]
    return ["--config", TINY_CONFIG] + [a for s in sets for a in ("--set", s)]


def _killed_in_checkpoint(out, ds, nproc):
    """Run on ``nproc`` ranks until checkpoint step_3 is in place, then SIGKILL every process."""
    proc = start_train(_args(out, ds, nproc), nproc=nproc, script=FAULT_ENTRY,
                       env={"FAULT_SLOW_CHECKPOINT": f"60:{KILL_AT}"})
    try:
        assert wait_for(lambda: (out / "checkpoints" / f"step_{KILL_AT}" / "meta.json").is_file(), proc,
                        timeout=300), tail(proc.stderr.read() if proc.poll() is not None else "")
    finally:
        kill_group(proc)
        proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    ds = zero3_partitioned(tmp)
    ref = run_train(_args(tmp / "ref", ds, 2), nproc=2)
    assert ref.returncode == 0, tail(ref.stderr)
    resumed = {}
    for before, after in ((2, 1), (1, 2)):
        out = tmp / f"{before}to{after}"
        _killed_in_checkpoint(out, ds, before)
        proc = run_train(_args(out, ds, after) + ["--resume"], nproc=after)
        assert proc.returncode == 0, tail(proc.stderr)
        resumed[(before, after)] = (out, proc.stderr)
    return tmp, ds, resumed


@pytest.mark.parametrize("change", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_continues_the_same_trajectory(runs, change):
    tmp, _, resumed = runs
    out, log = resumed[change]
    assert f"resumed from {out / 'checkpoints' / f'step_{KILL_AT}'} at step {KILL_AT}" in log, tail(log)
    assert "elastic resume: checkpoint written as" in log and f"x {change[0]} ranks x" in log, tail(log)
    z_ref, z = z_minus_1(tmp / "ref"), z_minus_1(out)
    assert float(z_ref.abs().max()) > 1e-3                       # the vectors moved
    rel = float((z - z_ref).norm() / z_ref.norm())
    print(f"{change}: relative difference of z-1 against the uninterrupted run {rel:.2e}")
    assert rel < SPLIT_TOL, rel
    losses = {r["step"]: r["loss"] for r in train_records(read_metrics(out))}
    ref = {r["step"]: r["loss"] for r in train_records(read_metrics(tmp / "ref"))}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(ref)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5)
    lrs = {r["step"]: r["lr"] for r in train_records(read_metrics(out))}
    assert lrs == pytest.approx({r["step"]: r["lr"] for r in train_records(read_metrics(tmp / "ref"))}, rel=1e-12)
    meta = json.loads((out / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == change[1] and meta["train.global_batch"] == 4
    assert not list((out / "checkpoints" / ".partial").iterdir())        # zero_to_fp32.py removed too


def test_a_changed_global_batch_is_refused_naming_the_factor(runs):
    tmp, ds, _ = runs
    proc = run_train(_args(tmp / "ref", ds, 1, ["train.micro_batch_size=8", "train.gradient_accumulation_steps=1"]) + ["--resume"], nproc=1)
    assert proc.returncode == 2, tail(proc.stderr)
    errors = [line for line in stderr_lines(proc.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, tail(proc.stderr)
    assert "written with a global batch of 4 samples" in errors[0] and "this run has 8" in errors[0], errors[0]
    assert "train.micro_batch_size and world_size changed the product" in errors[0], errors[0]
