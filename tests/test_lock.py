"""One run per output_dir, and every rank on the same output_dir (propulsion_ds.train.outdir_lock).

In one process: a held lock refuses a second holder naming it; a lock whose process is gone, of
the same (requeued) SLURM job, or broken on purpose is taken over; releasing it removes the
directories the run created. With real trainer processes: a second job on a locked output_dir
stops with one line and exit 2 while the first keeps its lock, and two ranks that see different
directories under one output_dir path (node-local disks, via tests/fault_entry.py) are refused at
start, both in one line, exit 2.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from helpers import (ROOT, TINY_CONFIG, kill_group, run_train, start_train, stderr_lines, tail,
                     wait_for)
from propulsion_ds.errors import OutputDirError
from propulsion_ds.train import outdir_lock

FAULT_ENTRY = ROOT / "tests" / "fault_entry.py"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_held_lock_refuses_a_second_run_and_is_released(tmp_path):
    out = tmp_path / "a" / "out"
    lock = outdir_lock.acquire(out, env={"SLURM_JOB_ID": "11"})
    held = json.loads((out / outdir_lock.LOCK_FILE).read_text())
    assert held["slurm_job_id"] == "11" and held["pid"] > 0 and held["host"] and held["started"]
    with pytest.raises(OutputDirError, match=rf"^output_dir {out} is in use by another run \(host .*, pid "
                                             rf"\d+, SLURM job 11, since .*\): wait for it to end"):
        outdir_lock.acquire(out, env={"SLURM_JOB_ID": "12"})
    lock.release()
    assert not (tmp_path / "a").exists()          # made by acquire, empty again: removed


@pytest.mark.parametrize("case", ["dead pid", "same SLURM job", "broken on purpose"])
def test_a_stale_lock_is_taken_over(tmp_path, case):
    import socket

    holder = {"host": socket.gethostname(), "pid": 1, "slurm_job_id": "7", "started": "x", "nonce": "n"}
    env = {}
    if case == "dead pid":
        holder["pid"] = _dead_pid()
    elif case == "same SLURM job":
        holder["host"], env = "another-node", {"SLURM_JOB_ID": "7"}
    else:
        holder["host"], env = "another-node", {outdir_lock.BREAK_LOCK_ENV: "1"}
    (tmp_path / outdir_lock.LOCK_FILE).write_text(json.dumps(holder))
    lock = outdir_lock.acquire(tmp_path, env=env)
    assert json.loads((tmp_path / outdir_lock.LOCK_FILE).read_text())["nonce"] == lock.record["nonce"] != "n"
    # the same record on another host, alive as far as anyone here can tell: refused
    (tmp_path / outdir_lock.LOCK_FILE).write_text(json.dumps({**holder, "host": "another-node"}))
    with pytest.raises(OutputDirError, match="in use by another run"):
        outdir_lock.acquire(tmp_path, env={"SLURM_JOB_ID": "8"})


@pytest.mark.slow
def test_a_second_job_on_a_locked_output_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    args = ["--config", TINY_CONFIG, "--set", f"output_dir={out}", "--set", "train.max_steps=100000",
            "--set", "eval.every_steps=100000", "--set", "checkpoint.every_steps=100000",
            "--set", "train.micro_batch_size=1", "--set", "data.max_length=16"]
    first = start_train(args, nproc=1)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").is_file(), first, timeout=300), tail(first.stderr.read())
        # a resubmission as the SLURM script makes it (resume=auto: no checkpoint yet, so a fresh
        # start that would clear the first run's outputs)
        second = run_train(args + ["--set", "resume=auto"], nproc=1)
        assert (out / "metrics.jsonl").is_file() and (out / "config.json").is_file()
        assert first.poll() is None                                   # the first run is untouched
        assert (out / outdir_lock.LOCK_FILE).is_file()
    finally:
        kill_group(first)
        first.communicate()
    assert second.returncode == 2, tail(second.stderr)
    errors = [line for line in stderr_lines(second.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {first.pid}," in errors[0], \
        tail(second.stderr)
    assert "Traceback" not in second.stderr


@pytest.mark.slow
def test_ranks_that_see_different_output_dirs_are_refused(tmp_path):
    args = ["--config", TINY_CONFIG, "--set", "train.max_steps=2", "--set", "data.max_length=16"]
    proc = run_train(args, nproc=2, env={"FAULT_NODE_LOCAL": str(tmp_path / "disks")}, script=FAULT_ENTRY)
    # torchrun exits 1 for any failed worker; its summary lists each rank's own code. Both ranks
    # leave with 2 together, but torchrun SIGTERMs (-15) a worker it sees still running once the
    # other has exited: which one is first is a race of milliseconds. No other code may appear.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert proc.returncode == 1 and "2" in codes and set(codes) <= {"2", "-15"}, tail(proc.stderr)
    errors = {line.split("error: ", 1)[1] for line in stderr_lines(proc.stderr) if "error: " in line}
    assert len(errors) == 1, errors
    error, = errors
    assert error.startswith(f"rank 1 does not see the output_dir {tmp_path / 'disks' / 'node1'} of rank 0 "
                            f"(it finds no {tmp_path / 'disks' / 'node1'}/.propulsion-view-"), error
    assert "not node-local disks" in error
    assert not (tmp_path / "disks" / "node0").exists()       # rank 0 removed its file and its new directory
