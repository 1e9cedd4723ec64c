"""propulsion_ds.distributed: the GPU a rank picks, and the orderly end of a process group.

``shutdown`` runs in real 2-process gloo groups (subprocesses, env:// rendezvous on a free port):
both ranks arrive -> both return True and the group is gone; one rank never arrives -> the other
returns False within its timeout instead of waiting for the collective timeout.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, free_port, train_env
from propulsion_ds.distributed import local_device_index

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("local_rank, count, want", [
    (0, 1, 0), (3, 1, 0), (7, 1, 0),          # SLURM binds one GPU per task: the only one is 0
    (0, 8, 0), (3, 8, 3), (7, 8, 7),          # every task sees the node's 8 GPUs
    (5, 4, 1), (2, 2, 0),                     # more ranks than visible GPUs: they share
])
def test_local_device_index(local_rank, count, want):
    assert local_device_index(local_rank, count) == want


def test_local_device_index_without_gpus():
    with pytest.raises(ValueError, match="no GPU"):
        local_device_index(0, 0)


RANK_SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys, time
    import torch
    from propulsion_ds import distributed as dist
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    mode, timeout = sys.argv[1], float(sys.argv[2])
    torch.distributed.barrier()
    if mode == "absent" and rank == 1:
        time.sleep(timeout + 8)          # never reaches the final barrier in time
        os._exit(0)
    if mode == f"late{rank}":
        time.sleep(1.0)                  # arrives late: the other rank must wait for it
    t0 = time.monotonic()
    ok = dist.shutdown(timeout)
    print(json.dumps({"rank": rank, "ok": ok, "seconds": time.monotonic() - t0,
                      "initialized": torch.distributed.is_initialized()}), flush=True)
    sys.stdout.flush()
    os._exit(0) if not ok else sys.exit(0)
""")


def _two_ranks(mode: str, timeout: float) -> dict:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, mode, str(timeout)], cwd=ROOT,
                              env=train_env({"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": str(port), "LOCAL_RANK": str(r)}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert "terminate called" not in err, err[-2000:]
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                results[rec["rank"]] = rec
    return results


@pytest.mark.parametrize("late", [0, 1])
def test_shutdown_when_every_rank_arrives(late):
    res = _two_ranks(f"late{late}", timeout=30)
    assert set(res) == {0, 1}
    assert all(r["ok"] and not r["initialized"] for r in res.values()), res
    # The early rank waited for the late one (1 s), and nobody waited for the timeout. Rank 0
    # hosts the store: whichever rank is late, it is the last to leave.
    early = res[1 - late]
    assert 0.8 < early["seconds"] < 20, res


def test_shutdown_returns_false_when_a_rank_never_arrives():
    t0 = time.monotonic()
    res = _two_ranks("absent", timeout=3)
    assert set(res) == {0}
    assert res[0]["ok"] is False and res[0]["initialized"], res
    assert 2.5 < res[0]["seconds"] < 10, res
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------ a rank that fails
def test_a_rank_failing_alone_stops_its_peer_with_the_same_code(tmp_path):
    """Two real trainer processes (env:// on a free port, gloo). Rank 1's data file is not text:
    it fails with exit 2 after the process group formed, while rank 0, whose data is good, goes on
    into the model's collectives and waits there for rank 1. distributed.timeout_minutes is 30, so
    without the failure marker rank 0 would wait for rank 1's final barrier (60 s) and then report
    a lost peer (exit 1). With it, both leave with rank 1's code, well inside the test's timeout."""
    from helpers import kill_group, small_text_file

    good = small_text_file(tmp_path / "good.txt", 20_000)
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    port = free_port()
    procs = []
    for r, data in ((0, good), (1, bad)):
        args = ["--config", "configs/tiny.json", "--set", "train.max_steps=2", "--set", f"data.train={data}",
                "--set", "distributed.timeout_minutes=30", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", f"output_dir={tmp_path / 'out'}"]
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT, start_new_session=True,
            env=train_env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)     # far below the 30 min collective timeout
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_group(p)
        raise AssertionError("a rank waited for the collective timeout") from None
    (code0, err0), (code1, err1) = results
    assert code1 == 2 and f"{bad}: not UTF-8 text" in err1, err1[-3000:]
    assert code0 == 2, err0[-3000:]                      # the failed rank's code, not a lost peer (1)
    assert "lost contact" not in err0 and "rank 1 failed (exit 2" in err0, err0[-3000:]
