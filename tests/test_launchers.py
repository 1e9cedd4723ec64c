"""Entry points: launch/train.py starts as a file from any directory, as a module and as the
propulsion-train console script; the exit codes live in launch/common.py. The deepspeed launcher
(which appends --local_rank=N) is run, 2 real ranks, by test_exit_stress.py's repeated runs, which
check what a run of it must leave behind."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
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
    import launch.train as train
    from propulsion_ds import errors

    assert errors.EXIT_PREEMPTED == errors.Preempted.exit_code == 75
    assert (errors.EXIT_OK, errors.EXIT_PEER_LOST, errors.EXIT_USAGE, errors.EXIT_STOPPED,
            errors.EXIT_INTERRUPTED) == (0, 1, 2, 3, 130)
    # The entry points use them, they do not define their own.
    defined = [f"{p.name}: {ln}" for p in sorted((ROOT / "launch").glob("*.py"))
               for ln in p.read_text().splitlines() if ln.startswith("EXIT_")]
    assert not defined, defined
    src = (ROOT / "launch" / "train.py").read_text()
    assert train.EXIT_USAGE is errors.EXIT_USAGE and "except PropulsionError as e:" in src
