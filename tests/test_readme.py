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


def test_readme_stays_short_and_shows_every_data_format():
    """A newcomer's page: under 20 KB (benchmarks and internals live in docs/), with one example
    row of each data format."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 20_000, f"README.md is {len(text.encode())} bytes: move details to docs/"
    for row in ('{"text": ', '{"instruction": ', '{"messages": [{"role": '):
        assert row in text, row


# ------------------------------------------------------------------ blocks marked runnable
def marked_blocks(marker: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks that directly follow ``<!-- marker -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"<!-- {re.escape(marker)} -->\n```{lang}\n(.*?)```", text, re.S)


def test_readme_marks_runnable_blocks():
    text = (ROOT / "README.md").read_text()
    assert len(marked_blocks("runnable", "bash")) == text.count("<!-- runnable -->") >= 2, (
        "every <!-- runnable --> marker must sit right above a ```bash block")


@pytest.mark.parametrize("block", marked_blocks("runnable", "bash"), ids=lambda b: b.split()[1][:40])
def test_readme_runnable_block(block):
    """litgpt's test_readme idea: a shell block the README marks runnable runs as written, from the
    repository root, and succeeds with output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), f"{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_readme_peft_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's peft block, executed unchanged where its paths exist: assets/stories260K and
    out/tiny/peft, exported by the README's own export command from an adapter with trained z."""
    import shlex

    import torch
    from conftest import random_z, set_z
    from helpers import stories260k

    from propulsion_ds.method.adapter import save_adapter
    from propulsion_ds.method.propulsion import PropulsionConfig, inject, merge_and_unload

    (snippet,) = marked_blocks("peft-snippet", "python")
    export = re.search(r"^\s*(python launch/export.py --adapter \S+ --to peft --out \S+)$",
                       (ROOT / "README.md").read_text(), re.M).group(1)
    model = stories260k()
    names = inject(model, PropulsionConfig())
    set_z(model, random_z(model, names, 1))
    argv = shlex.split(export)
    adapter, out = argv[argv.index("--adapter") + 1], argv[argv.index("--out") + 1]
    save_adapter(model, str(tmp_path / adapter))
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    proc = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / out).is_dir(), proc.stderr[-3000:]

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md (peft snippet)", "exec"), namespace)
    theirs = namespace["merged"].state_dict()
    ours = merge_and_unload(model).state_dict()
    base = stories260k().state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.allclose(theirs[key], value, rtol=1e-6, atol=1e-7), key
    moved = max(float((ours[k] - base[k]).abs().max()) for k in ours if k.endswith("proj.weight"))
    assert moved > 1e-4          # the adapter changed the weights peft had to reproduce
