"""launch/slurm/train.sbatch on a real SLURM (slurmctld + slurmd + munged started here, as root).

One node with 2 CPUs (scripts/slurm_local.sh):
  * a 2-task job trains to the end: adapter, checkpoints of both ranks, metrics and TensorBoard events;
  * a job warned with SIGUSR1 the way SLURM's `--signal=B:USR1@300` does it (to the batch shell) writes a
    checkpoint, requeues itself, resumes, and ends with the same adapter as the uninterrupted job.
Two nodes, each slurmd in its own network namespace (scripts/slurm_netns.sh): a 2-node job, one rank per
node, trains over the virtual network, with either launcher (one task per rank, or torchrun per node).

Skipped only when not root, or when the slurm/munge binaries are missing; the two-node test is skipped
when `ip netns add` is not permitted. Every cluster here has its own state directory and ports; the
one-node cluster is conftest.py's ``slurm_local`` (shared with test_exit_stress.py, torn down at the
end of the session), the two-node one is torn down at the end of this module.
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

from helpers import (SLURM_TERMINAL as TERMINAL, SlurmCluster, file_tail as _tail, free_port_pair,
                     read_metrics, slurm_state_dir, slurm_why_skip, small_text_file, train_records)

STEPS = 12

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(slurm_why_skip()), reason=slurm_why_skip() or "-")]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    # Part of tinyshakespeare: the same run, less tokenizing.
    return small_text_file(tmp_path_factory.mktemp("data") / "shakes.txt")


def _train_args(out: Path, data: Path) -> list:
    return ["--set", f"train.max_steps={STEPS}", "--set", "checkpoint.every_steps=4",
            "--set", "eval.every_steps=6", "--set", f"data.train={data}", "--set", f"output_dir={out}"]


@pytest.fixture(scope="module")
def local_cluster(slurm_local):
    return slurm_local


@pytest.fixture(scope="module")
def reference(local_cluster, small_data, tmp_path_factory):
    """One uninterrupted 2-task job, shared by several tests."""
    work = tmp_path_factory.mktemp("sbatch_ref")
    out, log = work / "out", work / "job.log"
    t0 = time.monotonic()
    jid = local_cluster.submit(log, ["--ntasks-per-node=2"], _train_args(out, small_data),
                               MASTER_PORT=str(free_port_pair()))
    info = local_cluster.wait(jid, log)
    return {"out": out, "log": log, "info": info, "seconds": time.monotonic() - t0}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "propulsion.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    import torch
    x, y = _adapter(a), _adapter(b)
    assert sorted(x) == sorted(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _train_records(out: Path) -> list:
    return train_records(read_metrics(out))


def _rank_files(step_dir: Path) -> set:
    return {int(m.group(1)) for p in step_dir.iterdir()
            if (m := re.match(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$", p.name))}


def test_sbatch_two_tasks_trains_to_the_end(reference):
    out, log, info = reference["out"], reference["log"], reference["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    text = log.read_text()
    assert "launcher srun" in text and "trainer exited with 0" in text
    # Every task met at the final barrier and left its process group (docs/RELIABILITY.md "Exit codes").
    assert "done: every rank reached the end of the run" in text and "terminate called" not in text
    assert (out / "FINISHED").read_text().strip() == str(STEPS)
    assert (out / "adapter" / "propulsion.safetensors").stat().st_size > 0
    meta = json.loads((out / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert _rank_files(out / "checkpoints" / f"step_{STEPS}") == {0, 1}
    assert [r["step"] for r in _train_records(out)] == list(range(1, STEPS + 1))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    records = {r["step"]: r["loss"] for r in _train_records(out)}
    assert all(abs(e.value - records[e.step]) < 1e-4 for e in losses)
    assert "eval/loss" in acc.Tags()["scalars"]
    print(f"uninterrupted 2-task job: {reference['seconds']:.0f} s")


def test_preempted_job_requeues_resumes_and_matches(local_cluster, reference, small_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    jid = local_cluster.submit(log, ["--ntasks-per-node=2"], _train_args(out, small_data),
                               MASTER_PORT=str(free_port_pair()))
    latest = out / "checkpoints" / "latest"
    polls = 0
    while not latest.exists():
        # The file every 0.1 s (the signal must come before the run ends), the job's state (an
        # scontrol process) every 1 s.
        if polls % 10 == 0:
            info = local_cluster.job(jid)
            assert info.get("JobState") not in TERMINAL, f"job ended before its first checkpoint:\n{_tail(log)}"
        polls += 1
        assert time.monotonic() - t0 < 300, f"no checkpoint after 300 s:\n{_tail(log)}"
        time.sleep(0.1)
    # What --signal=B:USR1@300 does near the time limit: SIGUSR1 to the batch shell only.
    local_cluster.scancel("--batch", "--signal=USR1", jid)
    info = local_cluster.wait(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    assert info["Restarts"] == "1", _tail(log)
    stopped = re.search(r"checkpoint step_(\d+) written", text)
    assert stopped, _tail(log)
    assert 4 <= int(stopped.group(1)) < STEPS, "the signal must have stopped the run before its end"
    assert "requeueing job" in text and f"resumed from {out / 'checkpoints'}/step_{stopped.group(1)}" in text
    assert "restart 1 on" in text and "trainer exited with 0" in text
    assert (out / "FINISHED").read_text().strip() == str(STEPS)
    # metrics.jsonl reads as one run: each step once, in order.
    assert [r["step"] for r in _train_records(out)] == list(range(1, STEPS + 1))
    _assert_same_adapter(out, reference["out"])
    print(f"preempted + requeued + resumed job: {time.monotonic() - t0:.0f} s")


# ------------------------------------------------------------------------------------ two nodes

def _netns_skip_reason() -> str:
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "ip (iproute2) or nsenter (util-linux) not installed"
    name = f"pds-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


@pytest.fixture(scope="module")
def netns_cluster():
    why = _netns_skip_reason()
    if why:
        pytest.skip(why)
    d = slurm_state_dir("pds-slurm-netns-")
    # Own names and subnet, so a developer's scripts/slurm_netns.sh cluster (pds, 10.77.0) is left alone.
    c = SlurmCluster("slurm_netns.sh", dict(os.environ, SLURM_NETNS_DIR=str(d), SLURM_NETNS_PREFIX="pdt",
                                            SLURM_NETNS_SUBNET="10.78.0",
                                            SLURM_NETNS_PORT=str(free_port_pair())))
    try:
        c.up()
        yield c
    finally:
        c.down()


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_two_nodes_train_over_the_network(netns_cluster, reference, small_data, tmp_path, launcher):
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    # The host name resolves to 127.0.0.1 in both namespaces: gloo must be told the interface.
    jid = netns_cluster.submit(log, ["--nodes=2", "--ntasks-per-node=1"], _train_args(out, small_data),
                               LAUNCHER=launcher, GLOO_SOCKET_IFNAME="pdt0",
                               MASTER_PORT=str(free_port_pair()))
    info = netns_cluster.wait(jid, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    assert info["NodeList"] == "node[1-2]"
    assert f"launcher {launcher}, master 10.78.0.1:" in text
    meta = json.loads((out / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert _rank_files(out / "checkpoints" / f"step_{STEPS}") == {0, 1}
    assert [r["step"] for r in _train_records(out)] == list(range(1, STEPS + 1))
    # Two ranks on two "nodes" reduce their gradients over the veth/bridge network and end where two
    # ranks on one node end: both trained, on their own shards.
    _assert_same_adapter(out, reference["out"])
    print(f"2-node job ({launcher}): {time.monotonic() - t0:.0f} s")
