"""The deepspeed launcher (which appends --local_rank=N) starts a real 2-rank ZeRO-3 run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_launcher_two_ranks(tmp_path):
    port = 29100 + os.getpid() % 400
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
           "--config", "configs/tiny.json", "--set", "train.max_steps=3", "--set", "eval.every_steps=3",
           "--set", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == 2
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
