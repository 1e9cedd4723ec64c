"""Subprocess helpers for tests that run the real trainer (torchrun, gloo, CPU).

    from helpers import ROOT, free_port, run_train, read_metrics    # tests/ is on sys.path under pytest

- ``run_train(args, nproc=2, port=None, env=None)`` runs ``launch/train.py`` (under ``torchrun`` when
  ``nproc > 1``, plain ``python`` otherwise) from the repository root and returns a
  ``subprocess.CompletedProcess`` with text stdout/stderr.
- ``start_train(...)`` is the same, without waiting: a ``Popen`` in its own process group;
  ``kill_group(proc)`` SIGKILLs torchrun and every rank (ranks run in sessions of their own).
- ``read_metrics(output_dir)`` parses ``metrics.jsonl``; ``train_records`` / ``eval_records`` split it.
- ``free_port()`` is a TCP port nobody listens on now (give each multi-rank run its own);
  ``free_port_pair()`` two consecutive ones (a SLURM controller and its slurmd).
- ``run_cli(script, *args)`` runs one of the entry points (``"train"``, ``"merge"``, ``"generate"``,
  ... under ``launch/``, or any script path) as one process with the training environment.
- ``tiny_config(**sections)`` is ``configs/tiny.json`` with sections overridden, ``write_config``
  writes one; ``tiny_llama(...)`` / ``tiny_qwen2(...)`` build small random models;
  ``stories260k()`` loads the real one, ``save_stories260k(dir, dtype)`` writes a copy (tokenizer
  included); ``random_adapter(model, dir)`` injects Propulsion with a random delta and saves it.
- ``log_tail(text)`` is a subprocess log without the warning noise, to put in assertion messages.
- ``SlurmCluster`` is a real SLURM brought up by scripts/slurm_local.sh or slurm_netns.sh (its own
  state directory and ports); ``slurm_why_skip()`` says why one cannot start here. conftest.py's
  session fixture ``slurm_local`` is the one-node cluster every SLURM test shares.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def free_port_pair() -> int:
    """A port p with p and p + 1 free now (slurmctld and slurmd of one local SLURM)."""
    for _ in range(50):
        p = free_port()
        if p >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        _given.add(p + 1)
        return p
    raise RuntimeError("no free port pair")


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


def run_cli(script, *args, env: dict | None = None, cwd=ROOT, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run an entry point as one process and wait: ``script`` is a name under ``launch/``
    (``"merge"`` is ``launch/merge.py``) or a path. Text stdout/stderr, the training environment."""
    path = Path(script)
    if not path.suffix:
        path = ROOT / "launch" / f"{script}.py"
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=cwd, env=train_env(env),
                          capture_output=True, text=True, timeout=timeout, input=input)


class Job:
    """A subprocess started now (the training environment, its own session), waited for on the
    first ``result()``; stdout/stderr go to files in ``log_dir``, so many can run side by side."""

    def __init__(self, cmd, log_dir: Path, name: str):
        self.name, self.cmd, self.t0 = name, [str(c) for c in cmd], time.monotonic()
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=train_env(), stdout=self._out, stderr=self._err,
                                     text=True, start_new_session=True)
        self.wall = None

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        if self.wall is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.wall = time.monotonic() - self.t0
            self._out.close()
            self._err.close()
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.out_path.read_text(),
                                           self.err_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._out.closed:
            self._out.close()
            self._err.close()


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


def log_tail(text: str | None, n_chars: int = 4000) -> str:
    """A subprocess log (stdout + stderr) without warning noise, cut to its last ``n_chars``."""
    return "\n".join(ln for ln in (text or "").splitlines()
                     if "Warning" not in ln and "warnings.warn" not in ln)[-n_chars:]


def tiny_config(**sections) -> dict:
    """``configs/tiny.json`` as a dict, with whole top-level values or single keys of a section
    replaced: ``tiny_config(train={"max_steps": 2}, output_dir="out")``."""
    cfg = json.loads(TINY_CONFIG.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path, cfg: dict | None = None, **sections) -> Path:
    """Write a config file (``cfg``, or ``tiny_config(**sections)``) and return its path."""
    path = Path(path)
    path.write_text(json.dumps(tiny_config(**sections) if cfg is None else cfg, indent=1))
    return path


def tiny_llama(seed: int = 0, **overrides):
    """A small random LLaMA (float32): 2 layers, hidden 32, vocab 128, unless overridden."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def stories260k(dtype=None):
    """The real stories260K (assets/stories260K), float32 unless ``dtype`` is given."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype or torch.float32)


# ------------------------------------------------------------------------------ a local SLURM
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
SLURM_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED"}


def slurm_why_skip() -> str:
    """Why a local SLURM cannot start here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root: starts munged, slurmctld and slurmd"
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurmctld slurmd slurm-client munge)"
    if not Path("/etc/munge/munge.key").is_file():
        return "/etc/munge/munge.key missing (reinstall the munge package)"
    return ""


def file_tail(path: Path, n: int = 60) -> str:
    """The last ``n`` lines of a log file, without warning noise and C++ stack frames."""
    if not path.is_file():
        return f"({path} does not exist)"
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if "Warning" not in ln and "warnings.warn" not in ln and not ln.startswith("frame #")]
    return "\n".join(lines[-n:])


def slurm_state_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)  # munged runs as the munge user and must reach its socket directory
    return d


class SlurmCluster:
    """A SLURM brought up by one of the scripts, with its own state directory and ports."""

    def __init__(self, script: str, env: dict):
        self.script = str(ROOT / "scripts" / script)
        self.env = env
        self.dir = Path(env.get("SLURM_LOCAL_DIR") or env["SLURM_NETNS_DIR"])
        self.conf = self.dir / "slurm.conf"

    @classmethod
    def local(cls, prefix: str = "pds-slurm-") -> "SlurmCluster":
        """One node with 2 CPUs (scripts/slurm_local.sh), not started yet."""
        return cls("slurm_local.sh", dict(os.environ, SLURM_LOCAL_DIR=str(slurm_state_dir(prefix)),
                                          SLURM_LOCAL_CPUS="2", SLURM_LOCAL_PORT=str(free_port_pair())))

    def up(self) -> None:
        r = subprocess.run([self.script, "up"], env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            logs = "\n".join(f"--- {p}\n{file_tail(p, 15)}" for p in sorted((self.dir / "log").glob("*.log")))
            raise RuntimeError(f"{self.script} up failed ({r.returncode}):\n{r.stdout}{r.stderr}\n{logs}")

    def down(self) -> None:
        subprocess.run([self.script, "down"], env=self.env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)

    def client_env(self, **extra) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", CONFIG="configs/tiny.json")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
            env.pop(k, None)
        env.update(extra)
        return env

    def submit(self, log: Path, sbatch_args: list, train_args: list, **env) -> str:
        """sbatch launch/slurm/train.sbatch; returns the job id. ``env``: the job's environment."""
        cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
               f"--output={log}", *sbatch_args, str(SBATCH), *map(str, train_args)]
        r = subprocess.run(cmd, cwd=ROOT, env=self.client_env(**env), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return r.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict:
        r = subprocess.run(["scontrol", "show", "job", "-o", jid], env=self.client_env(),
                           capture_output=True, text=True, timeout=60)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.client_env(), check=True, timeout=60)

    def wait(self, jid: str, log: Path, timeout: float = 400) -> dict:
        """Wait until the job ends; its final ``scontrol show job`` fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(jid)
            if info.get("JobState") in SLURM_TERMINAL:
                return info
            time.sleep(1.0)           # each poll is an scontrol process: 2 cores are shared with the job
        self.scancel(jid)
        raise AssertionError(f"job {jid} not finished after {timeout:.0f} s: {self.job(jid)}\n{file_tail(log)}")


def tiny_qwen2(seed: int = 0, bias_std: float = 0.1):
    """A small random Qwen2 (q/k/v carry biases), its biases drawn from N(0, bias_std): fresh
    biases are 0, which would make "the bias is trained/scaled too" untestable."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, bias_std)
    return model


def save_stories260k(dest, dtype=None):
    """stories260K saved to ``dest`` in ``dtype`` with its tokenizer files; returns the model."""
    dest = Path(dest)
    model = stories260k(dtype)
    model.save_pretrained(dest)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (dest / name).write_bytes((MODEL_DIR / name).read_bytes())
    return model


def random_adapter(model, directory, seed: int = 0, spread: float = 0.01, degree: int = 15, **cfg) -> Path:
    """Inject Propulsion (``degree``, ``cfg``) into ``model``, set a random delta (N(0, spread),
    seeded) and save the adapter to ``directory``."""
    import torch
    from propulsion_ds import PropulsionConfig, inject, save_adapter
    inject(model, PropulsionConfig(degree=degree, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta = model.propulsion_delta
        delta.copy_(torch.randn(delta.shape, generator=g) * spread)
    save_adapter(model, directory)
    return Path(directory)
