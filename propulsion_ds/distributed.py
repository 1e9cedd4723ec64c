"""Process-group set-up for every launcher: deepspeed, torchrun, mpirun and SLURM's srun."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list ("node[3-5,9],gpu1" -> "node3"), as the address slurmd uses.

    SLURM's NodeAddr is the host name on most clusters, and an IP where names do not resolve
    (containers, network namespaces); fall back to the name, then to parsing the list by hand.
    """
    first = None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            first = out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if first is None:
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.rstrip("]").split(",")[0].split("-")[0]
        return head
    try:
        node = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        for field in node.split():
            if field.startswith("NodeAddr=") and field[len("NodeAddr="):]:
                return field[len("NodeAddr="):]
    except (OSError, subprocess.SubprocessError):
        pass
    return first


def env_from_mpi(env=os.environ) -> None:
    """Under Open MPI's mpirun with a MASTER_PORT given (`-x MASTER_PORT=...`), map its variables to torch's.

    Without this DeepSpeed's MPI discovery always uses port 29500, so two jobs on one machine collide.
    MASTER_ADDR comes from the environment, or is 127.0.0.1 when every rank runs on this host; with
    several hosts and no MASTER_ADDR, DeepSpeed's discovery (rank 0's `hostname -I`, port 29500) is used.
    """
    if "OMPI_COMM_WORLD_RANK" not in env or "RANK" in env or "MASTER_PORT" not in env:
        return
    size = env.get("OMPI_COMM_WORLD_SIZE", "1")
    if "MASTER_ADDR" not in env:
        if env.get("OMPI_COMM_WORLD_LOCAL_SIZE") != size:
            return
        env["MASTER_ADDR"] = "127.0.0.1"
    env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
    env["WORLD_SIZE"] = size
    env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")


def env_from_slurm(env=os.environ) -> None:
    """When srun starts the trainer directly (one task per GPU), map SLURM's variables to torch's.

    Only inside a job step (srun sets SLURM_STEP_ID): the batch shell also carries SLURM_PROCID=0 and
    the job's SLURM_NTASKS, and a trainer started there without srun is one process, not rank 0 of N.
    torchrun (RANK) and mpirun (OMPI_COMM_WORLD_RANK, PMI_RANK) set their own variables and win.
    MASTER_ADDR/MASTER_PORT already in the environment (train.sbatch exports both) are kept.
    An mpirun launch (inside an allocation or not) is handed to env_from_mpi first.
    """
    env_from_mpi(env)
    if ("SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env or "RANK" in env
            or "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env):
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_addr(env.get("SLURM_STEP_NODELIST",
                                                       env.get("SLURM_JOB_NODELIST", "localhost")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _skip_shm_build() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op on first init (~60 s);
    # gloo alone gives the same step times. Patch the real module (see notes/deepspeed-on-cpu.md).
    import deepspeed.comm.torch  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(timeout_minutes: float = 30.0) -> None:
    import deepspeed

    env_from_slurm()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_build()
    if torch.distributed.is_initialized():
        return
    mpi = "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ
    single = not mpi and "RANK" not in os.environ
    if single:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(auto_mpi_discovery=mpi, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce(values: list, op="sum") -> list:
    """One collective for a handful of floats (loss, tokens, flags)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max"
                                     else torch.distributed.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_floats(value: float) -> list:
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out
