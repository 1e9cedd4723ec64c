"""launch/merge.py writes the merged model in the base checkpoint's dtype (bf16 stays bf16) unless
--dtype says otherwise, and says which in its output. Base: the real stories260K converted to bf16."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import random_adapter, run_cli, save_stories260k
from propulsion_ds import load_adapter

pytestmark = pytest.mark.slow
IDS = torch.tensor([[1, 403, 9, 77, 310, 52, 11, 250, 4, 499, 128, 3]])


def _cli(*args):
    return run_cli("merge", *args)


def _dtypes(directory: Path) -> set:
    out = set()
    for p in directory.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            out |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return out


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    model = save_stories260k(tmp / "base", torch.bfloat16)
    assert _dtypes(tmp / "base") == {"BF16"}
    random_adapter(model, tmp / "adapter", seed=0)
    return tmp


def test_bf16_base_stays_bf16_by_default(bf16):
    out = bf16 / "merged"
    r = _cli("--base", bf16 / "base", "--adapter", bf16 / "adapter", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "dtype bfloat16 (the base checkpoint's)" in r.stdout, r.stdout
    assert _dtypes(out) == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(str(out))          # config dtype: bf16
    assert merged.dtype == torch.bfloat16


def test_dtype_flag_changes_it_and_says_so(bf16):
    out = bf16 / "merged_fp32"
    r = _cli("--base", bf16 / "base", "--adapter", bf16 / "adapter", "--out", out, "--no-progress",
             "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "dtype float32 (--dtype)" in r.stdout, r.stdout
    assert _dtypes(out) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    # fp32 output of a bf16 base: the fold is not rounded to bf16 on the way
    ref = AutoModelForCausalLM.from_pretrained(str(bf16 / "base"), dtype=torch.float32).eval()
    load_adapter(ref, bf16 / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert merged.dtype == torch.float32
    with torch.no_grad():
        a, b = ref(input_ids=IDS).logits, merged(input_ids=IDS).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_bad_dtype_is_one_line(bf16, tmp_path):
    r = _cli("--base", bf16 / "base", "--adapter", bf16 / "adapter", "--out", tmp_path / "o", "--dtype", "int8")
    assert r.returncode == 2 and "--dtype" in r.stderr
