"""launch/generate.py: streams the adapter's greedy completion (the same text as an in-process
generate of base + adapter), in the checkpoint's own dtype, on cuda when present else cpu."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from propulsion_ds import PropulsionConfig, inject, load_adapter, save_adapter
from propulsion_ds.model import load_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "assets/stories260K"
PROMPT = "Once upon a time"


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp / "bf16")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp / "bf16" / name).write_bytes((STORIES / name).read_bytes())
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    inject(model, PropulsionConfig(degree=15))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.propulsion_delta.copy_(torch.randn(model.propulsion_delta.shape, generator=g) * 0.02)
    save_adapter(model, tmp / "adapter")
    return tmp


def _expected(model_dir, adapter, dtype, n):
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def test_streams_the_adapters_greedy_completion(work):
    r = _run("--model", STORIES, "--adapter", work / "adapter", "--prompt", PROMPT, "--max-new-tokens", 30)
    assert r.returncode == 0, r.stderr[-2000:]
    want = _expected(STORIES, work / "adapter", torch.float32, 30)
    assert r.stdout.strip() == want.strip()
    assert want.strip() != _expected(STORIES, None, torch.float32, 30).strip()   # the adapter matters
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"generating on {device} in float32 with adapter" in r.stderr


def test_runs_in_the_checkpoints_dtype(work):
    r = _run("--model", work / "bf16", "--adapter", work / "adapter", "--prompt", PROMPT, "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "in bfloat16" in r.stderr
    assert r.stdout.strip() == _expected(work / "bf16", work / "adapter", torch.bfloat16, 12).strip()
    r = _run("--model", work / "bf16", "--prompt", PROMPT, "--max-new-tokens", 4, "--dtype", "fp32")
    assert r.returncode == 0 and "in float32" in r.stderr


def test_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _run("--model", STORIES, "--prompt", PROMPT, "--device", "cuda")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --device: cuda requested but no GPU is available"]
