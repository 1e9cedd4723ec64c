"""Entry points: the deepspeed launcher (which appends --local_rank=N) starts a real 2-rank ZeRO-3 run
that ends cleanly on every rank; launch/train.py starts as a file from any directory, as a module and as
the propulsion-train console script; the exit codes live in launch/common.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_launcher_two_ranks(tmp_path):
    port = 29100 + os.getpid() % 400
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
           "--config", "configs/tiny.json", "--set", "train.max_steps=3", "--set", "eval.every_steps=3",
           "--set", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    # Rank 0's final line comes after every rank met at the final barrier and left the group.
    assert proc.stderr.rstrip().splitlines()[-1].endswith("done: every rank reached the end of the run"), \
        proc.stderr[-3000:]
    meta = json.loads((tmp_path / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == 2
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]


@pytest.mark.parametrize("how", ["file", "module", "console"])
def test_train_entry_points_start_from_anywhere(how, tmp_path):
    """`python launch/train.py` from another directory (what deepspeed/torchrun run), `python -m
    launch.train`, and the installed console script all reach the argument parser."""
    if how == "file":
        cmd, cwd = [sys.executable, str(ROOT / "launch" / "train.py"), "--help"], tmp_path
    elif how == "module":
        cmd, cwd = [sys.executable, "-m", "launch.train", "--help"], ROOT
    else:
        exe = shutil.which("propulsion-train")
        if exe is None:
            pytest.skip("propulsion-train not installed (pip install -e .)")
        cmd, cwd = [exe, "--help"], tmp_path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "Exit codes" in proc.stdout


def test_exit_codes_in_one_place():
    import launch.common as common
    import launch.train as train
    from propulsion_ds import errors

    assert common.EXIT_PREEMPTED == errors.EXIT_PREEMPTED == errors.Preempted.exit_code == 75
    assert (common.EXIT_OK, common.EXIT_PEER_LOST, common.EXIT_USAGE, common.EXIT_STOPPED,
            common.EXIT_INTERRUPTED) == (0, 1, 2, 3, 130)
    # train.py uses them, it does not define its own.
    src = (ROOT / "launch" / "train.py").read_text()
    assert not [ln for ln in src.splitlines() if ln.startswith("EXIT_")]
    assert train.EXIT_USAGE is common.EXIT_USAGE and "except PropulsionError as e:" in src
