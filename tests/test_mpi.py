"""launch/train.py under Open MPI's mpirun: 2 ranks on this machine train and checkpoint together.

Ranks learn their rank and world size from Open MPI (OMPI_COMM_WORLD_*); MASTER_PORT passed with
`-x MASTER_PORT` is honoured (propulsion_ds.distributed.env_from_mpi), so this test can hold DeepSpeed's
default port 29500 busy and still pass. Skipped when mpirun or mpi4py is not installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _why_skip() -> str:
    if shutil.which("mpirun") is None:
        return "mpirun not installed (apt-get install -y openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install mpi4py)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_skip()), reason=_why_skip() or "-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_mpirun_two_ranks(tmp_path):
    text = (REPO / "assets" / "data" / "tinyshakespeare.txt").read_text().splitlines(keepends=True)
    data = tmp_path / "shakes.txt"
    data.write_text("".join(text[:8000]))
    out = tmp_path / "out"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(port))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2",
           "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "MASTER_PORT",
           sys.executable, "launch/train.py", "--config", "configs/tiny.json",
           "--set", f"train.max_steps={STEPS}", "--set", "checkpoint.every_steps=4",
           "--set", f"eval.every_steps={STEPS}", "--set", f"data.train={data}",
           "--set", f"output_dir={out}"]
    # Hold DeepSpeed's default port: the run must use the MASTER_PORT it was given.
    busy = socket.socket()
    try:
        busy.bind(("", 29500))
        busy.listen()
    except OSError:
        pass  # already taken by someone else: just as busy
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        busy.close()
    log = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines()
                    if "Warning" not in ln and "warnings.warn" not in ln)[-4000:]
    assert r.returncode == 0, log
    assert (out / "FINISHED").read_text().strip() == str(STEPS)
    step_dir = out / "checkpoints" / f"step_{STEPS}"
    assert json.loads((step_dir / "meta.json").read_text())["world_size"] == 2
    ranks = {int(m.group(1)) for p in step_dir.iterdir()
             if (m := re.match(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$", p.name))}
    assert ranks == {0, 1}, sorted(p.name for p in step_dir.iterdir())
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if ln.strip() and "loss" in json.loads(ln)]
    assert steps == list(range(1, STEPS + 1))
    print(f"mpirun -np 2: {time.monotonic() - t0:.0f} s")
