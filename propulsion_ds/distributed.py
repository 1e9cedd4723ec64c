"""Process-group set-up for every launcher: deepspeed, torchrun, mpirun and SLURM's srun."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list ("node[3-5,9],gpu1" -> "node3")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return first


def env_from_slurm(env=os.environ) -> None:
    """When srun starts the trainer directly (one task per GPU), map SLURM's variables to torch's."""
    if "SLURM_PROCID" not in env or "RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env.setdefault("MASTER_ADDR", slurm_master_addr(env.get("SLURM_JOB_NODELIST", "localhost")))
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
