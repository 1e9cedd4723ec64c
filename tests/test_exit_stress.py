"""Every rank of every launcher exits cleanly, run after run (docs/RELIABILITY.md "Exit codes").

The symptom this guards: a run that trained to the end, then one rank died at interpreter exit
(`terminate called without an active exception`, SIGABRT, exit 134) because the process group was
never torn down, turning a finished SLURM job into a FAILED one. It happened on a fraction of runs,
so one run proves little: each launcher runs the same short job RUNS times in a row (5; override with
PDS_STRESS_RUNS):

  * the 2-task sbatch job (launch/slurm/train.sbatch, srun per rank) on a real local SLURM;
  * torchrun --nproc_per_node 2;
  * the deepspeed launcher, deepspeed --num_gpus 2 (2 CPU ranks); these runs are also the suite's
    test of that launcher (it appends --local_rank=N; a real 2-rank ZeRO-3 run checkpoints with
    world size 2, logs every step, and its stderr ends with rank 0's final line).

Every run must end with exit 0 on every rank (SLURM: JobState COMPLETED, ExitCode 0:0; torchrun and the
deepspeed launcher exit non-zero when any worker does), and nothing may appear on stderr after the run's
final line: the last line the trainer logs ("[rankN] ..."); only tqdm's progress-bar redraws may follow.
A crash at exit prints after it (`terminate called ...`, `srun: error: ... task 1: Aborted`, C++
warnings), so it fails the check even when a launcher would not notice.

The SLURM part is skipped where test_slurm.py is (not root, no slurm/munge); each part runs its RUNS
jobs as one test, sharing one cluster and one small data file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (ROOT, free_port, free_port_pair, read_metrics, small_text_file, train_command, train_env,
                     train_records)

RUNS = int(os.environ.get("PDS_STRESS_RUNS", "5"))
STEPS = 4
# Lines that mean a process died badly, wherever they appear on stderr.
CRASH = re.compile(r"terminate called|Aborted|core dumped|Segmentation fault|SIGABRT|SIGSEGV|Traceback"
                   r"|srun: error|exitcode|ChildFailedError|error:", re.IGNORECASE)
DONE = "done: every rank reached the end of the run"
LOG_LINE = re.compile(r"\[rank\d+\] \d{4}-\d\d-\d\d ")
TQDM = re.compile(r"^\s*(train|eval|tokenize[^:]*|[\w ]+):\s+\d+%\|")


def _short_args(data: Path, out: Path) -> list:
    # A few steps with a small eval at the end: start-up, train, eval, checkpoint, adapter, exit.
    return ["--config", "configs/tiny.json", "--set", f"train.max_steps={STEPS}",
            "--set", f"eval.every_steps={STEPS}", "--set", "eval.max_batches=2",
            "--set", f"checkpoint.every_steps={STEPS}", "--set", f"data.train={data}",
            "--set", f"output_dir={out}"]


def _segments(stderr: str) -> list:
    return re.split(r"[\r\n]", stderr)     # tqdm redraws with \r and glues log lines to the bar


def after_final_line(stderr: str) -> list:
    """What stderr holds after the run's final log line, tqdm redraws left out."""
    segments = _segments(stderr)
    last = max((i for i, s in enumerate(segments) if LOG_LINE.search(s)), default=-1)
    return [s for s in segments[last + 1:] if s.strip() and not TQDM.match(s)]


def check_clean(stderr: str, what: str, done: bool = True) -> list:
    """Problems with one run's stderr (empty when it is clean). ``done``: the final log line must be
    launch/train.py's "done: every rank reached the end of the run" (logged after the final barrier)."""
    problems = []
    logged = [s for s in _segments(stderr) if LOG_LINE.search(s)]
    if not logged:
        problems.append(f"{what}: no trainer log line on stderr")
    elif done and DONE not in logged[-1]:
        problems.append(f"{what}: the final log line is not {DONE!r}: {logged[-1][-200:]!r}")
    crash = [ln for ln in stderr.splitlines() if CRASH.search(ln)]
    if crash:
        problems.append(f"{what}: crash lines: {crash[:5]}")
    late = after_final_line(stderr)
    if late:
        problems.append(f"{what}: stderr after the final line: {late[:5]}")
    return problems


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_text_file(tmp_path_factory.mktemp("stress") / "shakes.txt")


def _finished(out: Path) -> bool:
    return (out / "FINISHED").is_file() and (out / "FINISHED").read_text().strip() == str(STEPS)


def _trained(out: Path, what: str) -> list:
    """Problems with a finished 2-rank run's outputs: a checkpoint of both ranks, every step logged."""
    problems = []
    meta = out / "checkpoints" / f"step_{STEPS}" / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("world_size") != 2:
        problems.append(f"{what}: no step_{STEPS} checkpoint of world size 2 ({meta})")
    steps = [r["step"] for r in train_records(read_metrics(out))] if (out / "metrics.jsonl").is_file() else []
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"{what}: metrics.jsonl steps {steps}, not 1..{STEPS}")
    return problems


def _report(name: str, results: list) -> None:
    walls = [w for _, w in results]
    print(f"\n{name}: {sum(ok for ok, _ in results)}/{len(results)} clean; wall s per run "
          f"{', '.join(f'{w:.1f}' for w in walls)} (total {sum(walls):.0f})")


def _run_launcher(cmd: list, out: Path, env: dict) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return r.returncode, r.stderr, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.stress
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launcher_runs_exit_cleanly(launcher, data, tmp_path):
    if launcher == "deepspeed" and shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    problems, results = [], []
    for i in range(RUNS):
        out = tmp_path / f"run{i}"
        args = _short_args(data, out)
        if launcher == "torchrun":
            cmd = train_command(args, nproc=2, port=free_port())
        else:
            cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", *args]
        rc, err, wall = _run_launcher(cmd, out, train_env())
        run_problems = ([] if rc == 0 else [f"run {i}: exit {rc}"]) + check_clean(err, f"run {i}")
        if not _finished(out):
            run_problems.append(f"run {i}: no FINISHED marker for step {STEPS}")
        else:
            run_problems += _trained(out, f"run {i}")
        last = (err.rstrip().splitlines() or [""])[-1]
        if launcher == "deepspeed" and not last.endswith(DONE):
            # Rank 0's final line comes after every rank met at the final barrier and left the group.
            run_problems.append(f"run {i}: stderr does not end with {DONE!r}: {last[-200:]!r}")
        if run_problems:
            problems += run_problems + [f"run {i} stderr tail:\n" + "\n".join(err.splitlines()[-15:])]
        results.append((not run_problems, wall))
    _report(launcher, results)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.stress
def test_sbatch_runs_complete_cleanly(slurm_local, data, tmp_path):
    local_cluster = slurm_local
    problems, results = [], []
    for i in range(RUNS):
        out, log, err_log = tmp_path / f"run{i}", tmp_path / f"job{i}.out", tmp_path / f"job{i}.err"
        t0 = time.monotonic()
        jid = local_cluster.submit(log, ["--ntasks-per-node=2", f"--error={err_log}"],
                                   _short_args(data, out)[2:], MASTER_PORT=str(free_port_pair()))
        info = local_cluster.wait(jid, log)
        wall = time.monotonic() - t0
        err = err_log.read_text(errors="replace") if err_log.is_file() else ""
        run_problems = []
        if (info.get("JobState"), info.get("ExitCode")) != ("COMPLETED", "0:0"):
            run_problems.append(f"job {i} ({jid}): {info.get('JobState')} ExitCode {info.get('ExitCode')}")
        if "trainer exited with 0" not in log.read_text(errors="replace"):
            run_problems.append(f"job {i}: train.sbatch did not report exit 0 from every task")
        run_problems += check_clean(err, f"job {i}")
        if not _finished(out):
            run_problems.append(f"job {i}: no FINISHED marker for step {STEPS}")
        if run_problems:
            problems += run_problems + [f"job {i} stderr tail:\n" + "\n".join(err.splitlines()[-15:])]
        results.append((not run_problems, wall))
    _report("sbatch (srun, 2 tasks)", results)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the checker itself (fast)

def test_checker_sees_a_crash_after_the_final_line():
    good = ("tokenize: 100%|##| 3/3\n[rank0] 2026-01-01 00:00:00,000 INFO x: step 4 eval loss 4.2\n"
            "\rtrain: 100%|##########| 4/4 [00:01<00:00,  3.54step/s]\n")
    assert any("final log line" in p for p in check_clean(good, "r"))
    assert check_clean(good, "r", done=False) == []
    good += f"[rank0] 2026-01-01 00:00:01,000 INFO launch.train: {DONE}\n"
    assert check_clean(good, "r") == []
    bad = good + "terminate called without an active exception\n"
    assert any("crash" in p for p in check_clean(bad, "r"))
    late = good + "[W1201 20:00:00.000 ProcessGroupGloo.cpp:1] Warning: something at exit\n"
    assert any("after the final line" in p for p in check_clean(late, "r"))
