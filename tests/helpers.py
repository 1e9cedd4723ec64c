"""Subprocess helpers for tests that run the real trainer (torchrun, gloo, CPU).

    from helpers import ROOT, free_port, run_train, read_metrics    # tests/ is on sys.path under pytest

- ``run_train(args, nproc=2, port=None, env=None)`` runs ``launch/train.py`` (under ``torchrun`` when
  ``nproc > 1``, plain ``python`` otherwise) from the repository root and returns a
  ``subprocess.CompletedProcess`` with text stdout/stderr.
- ``start_train(...)`` is the same, without waiting: a ``Popen`` in its own process group;
  ``kill_group(proc)`` SIGKILLs torchrun and every rank (ranks run in sessions of their own).
- ``read_metrics(output_dir)`` parses ``metrics.jsonl``; ``train_records`` / ``eval_records`` split it.
- ``free_port()`` is a TCP port nobody listens on now (give each multi-rank run its own).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
MODEL_DIR = ROOT / "assets" / "stories260K"
TINY_CONFIG = ROOT / "configs" / "tiny.json"


def free_port() -> int:
    """A port the OS reports free now. Ports handed out by this process are not reused."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given and port < 61000:
            _given.add(port)
            return port


_given: set = set()


def train_env(env: dict | None = None) -> dict:
    """The environment a trainer subprocess gets: OMP_NUM_THREADS=1, offline hubs, repo on the path."""
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = str(ROOT) + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    # Rank variables of an outer launcher (a test run under torchrun/srun) must not leak in.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        out.pop(key, None)
    if env:
        out.update(env)
    return out


def train_command(args, nproc: int = 2, port: int | None = None, script=TRAIN) -> list[str]:
    args = [str(a) for a in args]
    if nproc <= 1:
        return [sys.executable, str(script), *args]
    port = port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *args]


def run_train(args, nproc: int = 2, port: int | None = None, env: dict | None = None,
              timeout: float = 600, script=TRAIN) -> subprocess.CompletedProcess:
    """Run the trainer to completion; returns the CompletedProcess (text stdout/stderr)."""
    proc = start_train(args, nproc=nproc, port=port, env=env, script=script)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout} s\n{tail(err)}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_train(args, nproc: int = 2, port: int | None = None, env: dict | None = None,
                script=TRAIN, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start the trainer in its own process group (see ``kill_group``) and return the Popen."""
    return subprocess.Popen(train_command(args, nproc, port, script), cwd=ROOT, env=train_env(env),
                            stdout=stdout, stderr=stderr, text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> list[int]:
    """Signal the launcher ``start_train`` started and every process under it; returns the pids.

    torchrun puts each rank in a session of its own, so signalling torchrun's process group
    alone would leave the ranks running: the ranks (and anything they started) are signalled by
    pid first, then the launcher's group.
    """
    pids = descendants(proc.pid)
    for pid in reversed(pids):                 # deepest first
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    return pids


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 300,
             interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true; False if ``proc`` exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(records) -> list[dict]:
    return [r for r in records if "loss" in r]


def eval_records(records) -> list[dict]:
    return [r for r in records if "eval_loss" in r]


def ckpt_bytes(step_dir) -> int:
    """Sum of the sizes of the files in one checkpoint directory (recursive)."""
    return sum(p.stat().st_size for p in Path(step_dir).rglob("*") if p.is_file())


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def tail(text: str | None, n: int = 40) -> str:
    """The last ``n`` lines of a log, without the FutureWarning noise torch+deepspeed print."""
    lines = [ln for ln in (text or "").splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    return "\n".join(lines[-n:])


def small_text_file(path, n_bytes: int = 200_000) -> Path:
    """The first ``n_bytes`` of tinyshakespeare (cut at a line end): tokenizes in well under 1 s."""
    src = (ROOT / "assets" / "data" / "tinyshakespeare.txt").read_text()
    text = src[:n_bytes]
    text = text[: text.rfind("\n") + 1]
    path = Path(path)
    path.write_text(text)
    return path
