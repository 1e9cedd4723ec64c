"""The README's commands are the contract with a newcomer (litgpt's test_readme): run them."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_main_job_and_test_command():
    main, tests = readme_commands()[:2]
    assert main.startswith("bash scripts/install.sh && ") and "configs/tiny.json" in main
    assert tests.startswith("bash scripts/install.sh --dev && ") and "pytest" in tests
    ci = (ROOT / ".ci/run").read_text()
    assert tests in ci, ".ci/run must run exactly the README's test command"


def test_readme_main_job_runs_and_beats_the_frozen_base(tmp_path):
    main = readme_commands()[0]
    job = main.split(" && ", 1)[1]          # the install half is what CI itself just ran
    port = 29000 + os.getpid() % 500
    job = job.replace("torchrun ", f"{sys.executable} -m torch.distributed.run --master_port {port} ", 1)
    job += f" --set output_dir={tmp_path}/tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(job, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tiny"
    assert (out / "FINISHED").is_file()
    assert (out / "adapter" / "propulsion.safetensors").is_file()
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[0]["step"] == 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals
    meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
                       / "meta.json").read_text())
    assert meta["world_size"] == 2
