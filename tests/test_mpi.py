"""launch/train.py under Open MPI's mpirun: 2 ranks on this machine train and checkpoint together.

Ranks learn their rank and world size from Open MPI (OMPI_COMM_WORLD_*); MASTER_PORT passed with
`-x MASTER_PORT` is honoured (propulsion_ds.distributed.env_from_mpi), so this test can hold DeepSpeed's
default port 29500 busy and still pass. Skipped when mpirun or mpi4py is not installed.

A rank that fails on its own ends the MPI job with MPI_Abort and its own exit code, so mpirun
exits with that code: one rank with a bad config (fails before any process group), one rank with a bad
data file (fails after the group formed, while the other waits in a collective for it). The two ranks
get different arguments through mpirun's MPMD form (`-np 1 A : -np 1 B`).
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT as REPO, free_port, log_tail, small_text_file, train_env

STEPS = 6


def _why_skip() -> str:
    if shutil.which("mpirun") is None:
        return "mpirun not installed (apt-get install -y openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install mpi4py)"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_why_skip()), reason=_why_skip() or "-")]


def _data(tmp_path):
    return small_text_file(tmp_path / "shakes.txt")


def _env() -> dict:
    return train_env({"DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())})


MPIRUN = ["mpirun", "--allow-run-as-root", "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "MASTER_PORT"]
TRAIN = [sys.executable, "launch/train.py"]


def _log(r) -> str:
    return log_tail(r.stdout + r.stderr)


def test_mpirun_two_ranks(tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "out"
    env = _env()
    cmd = [*MPIRUN, "-np", "2", *TRAIN, "--config", "configs/tiny.json",
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
    log = _log(r)
    assert r.returncode == 0, log
    assert "terminate called" not in log and "done: every rank reached the end of the run" in log, log
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


def _good_args(tmp_path, data) -> list:
    # distributed.timeout_minutes=1: the final barrier waits at most 30 s for a peer.
    return ["--config", "configs/tiny.json", "--set", "train.max_steps=2", "--set", f"data.train={data}",
            "--set", "distributed.timeout_minutes=1", "--set", f"output_dir={tmp_path / 'out'}"]


def test_rank_with_bad_config_aborts_the_job(tmp_path):
    """Rank 1 fails before any process group: MPI_Abort(2), and mpirun exits 2 at once. A normal
    exit would wait in MPI_Finalize while rank 0 waits for rank 1 at the rendezvous."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"name_or_path": "assets/stories260K"}, "bogus": 1}))
    cmd = [*MPIRUN, "-np", "1", *TRAIN, *_good_args(tmp_path, _data(tmp_path)),
           ":", "-np", "1", *TRAIN, "--config", str(bad)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    seconds = time.monotonic() - t0
    assert r.returncode == 2, _log(r)
    assert "error: unknown key 'bogus'" in r.stderr, _log(r)
    assert seconds < 50, f"{seconds:.0f} s: rank 0 waited for the failed rank\n{_log(r)}"
    print(f"bad config on rank 1: mpirun exit {r.returncode} after {seconds:.0f} s")


def test_rank_with_bad_data_aborts_the_job_with_its_code(tmp_path):
    """Rank 1 fails after the group formed (its data file is not text), rank 0 waits for it in a
    collective. Rank 1's final barrier times out (30 s, half the collective timeout) and it ends the
    job with MPI_Abort(2): mpirun exits 2, the real cause, not 1 from rank 0's collective timeout."""
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    good = _good_args(tmp_path, _data(tmp_path))
    cmd = [*MPIRUN, "-np", "1", *TRAIN, *good, ":", "-np", "1", *TRAIN, *good, "--set", f"data.train={bad}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - t0
    assert r.returncode == 2, _log(r)
    assert f"error: rank 1: {bad}: not UTF-8 text" in r.stderr, _log(r)     # rank 0 waits in a collective: rank 1 speaks
    print(f"bad data on rank 1: mpirun exit {r.returncode} after {seconds:.0f} s")
