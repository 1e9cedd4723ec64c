"""Preemption during eval: the stop flag is agreed on between eval batches and before each generate
call, so a stop mid-eval checkpoints the step it evaluates and exits 75, without finishing the
eval and without training another step.

tests/fault_entry.py's FAULT_SIGNAL_IN_EVAL=N sends SIGUSR1 to the process at its N-th eval-loss
forward; eval runs at steps 0, 2, 4 (eval.every_steps=2, checkpoint.every_steps=100):

- one rank, 3 eval batches per eval: the signal at forward 5 (the step-2 eval's second batch) is
  seen before its third batch;
- two ranks, one eval batch per rank, then generation: the signal on rank 1 only, at forward 2 (the
  step-2 eval's only batch), is seen by both ranks before the first generate call.

Read only at step boundaries (as before), the signal would let the eval finish, train step 3 and
checkpoint step_3.
"""
from __future__ import annotations

import re

import pytest

from helpers import (ROOT, TINY_CONFIG, eval_records, read_metrics, run_train, small_text_file, tail,
                     train_records)

pytestmark = pytest.mark.slow

FAULT_ENTRY = ROOT / "tests" / "fault_entry.py"


def args(out, train_file, *extra) -> list:
    settings = [f"output_dir={out}", f"data.train={train_file}", "data.max_length=32", "train.max_steps=6",
                "train.micro_batch_size=2", "eval.every_steps=2", "checkpoint.every_steps=100", *extra]
    return ["--config", TINY_CONFIG] + [a for s in settings for a in ("--set", s)]


def check_stopped_in_step_2_eval(out, stderr: str) -> None:
    # The rank that got the signal says so (prefixed with its rank where the ranks' lines differ).
    errors = re.findall(r"error: (?:rank \d+: )?(SIGUSR1 received during the eval .*)", stderr)
    assert len(set(errors)) == 1 and "at step 2: checkpoint step_2 written" in errors[0], tail(stderr)
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert steps == [2], steps
    records = read_metrics(out)
    assert [r["step"] for r in train_records(records)] == [1, 2]
    assert [r["step"] for r in eval_records(records)] == [0]          # the step-2 eval did not finish


def test_sigusr1_during_eval_checkpoints_and_exits_75(tmp_path):
    data = small_text_file(tmp_path / "train.txt")
    out = tmp_path / "out"
    proc = run_train(args(out, data, "eval.max_batches=3"), nproc=1, script=FAULT_ENTRY,
                     env={"FAULT_SIGNAL_IN_EVAL": "5"})
    assert "test hook FAULT_SIGNAL_IN_EVAL: eval forward 5" in proc.stderr, tail(proc.stderr)
    assert proc.returncode == 75, tail(proc.stderr)
    check_stopped_in_step_2_eval(out, proc.stderr)


def test_sigusr1_on_one_rank_during_generation_stops_both(tmp_path):
    data = small_text_file(tmp_path / "train.txt")
    out = tmp_path / "out"
    proc = run_train(args(out, data, "eval.max_batches=1", "eval.generate=true", "eval.generate_samples=8",
                          "eval.max_new_tokens=8", "eval.metric=none"),
                     nproc=2, script=FAULT_ENTRY, env={"FAULT_SIGNAL_IN_EVAL": "2", "FAULT_SIGNAL_RANK": "1"})
    assert "test hook FAULT_SIGNAL_IN_EVAL: eval forward 2" in proc.stderr, tail(proc.stderr)
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*75", proc.stderr), tail(proc.stderr)
    check_stopped_in_step_2_eval(out, proc.stderr)
