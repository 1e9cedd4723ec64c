"""launch/generate.py: streams the adapter's greedy completion (the same text as an in-process
generate of base + adapter), in the checkpoint's own dtype, on cuda when present else cpu."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import random_adapter, run_cli, save_stories260k, stories260k
from propulsion_ds import load_adapter, save_adapter
from propulsion_ds.model import load_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "assets/stories260K"
PROMPT = "Once upon a time"


def _run(*args):
    return run_cli("generate", *args)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    save_stories260k(tmp / "bf16", torch.bfloat16)
    random_adapter(stories260k(), tmp / "adapter", seed=0, spread=0.02)
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


# --------------------------------------------------------------------------- the training template
QUESTION = "What do cats like to eat?"
TEMPLATE = "Q: {instruction}\nA:"


def _greedy_from_ids(adapter, ids, n):
    tok = load_tokenizer(str(STORIES))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    load_adapter(model, adapter)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


@pytest.fixture(scope="module")
def instruction_adapters(work):
    """The fixture's adapter saved as an instruction run saves it: one with the Alpaca template
    (data.template null), one with a custom template, and an older one known only by its run's
    config.json beside it."""
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    load_adapter(model, work / "adapter")
    save_adapter(model, work / "alpaca" / "adapter", prompt={"format": "instruction", "template": None})
    save_adapter(model, work / "custom" / "adapter", prompt={"format": "instruction", "template": TEMPLATE})
    save_adapter(model, work / "old" / "adapter")
    (work / "old" / "config.json").write_text('{"data": {"format": "instruction", "template": "%s"}}'
                                              % TEMPLATE.replace("\n", "\\n"))
    return work


def test_instruction_adapters_see_the_training_template(instruction_adapters):
    from propulsion_ds.data.tokens import ALPACA_TEMPLATE_NO_INPUT

    work, tok = instruction_adapters, load_tokenizer(str(STORIES))
    cases = [("alpaca", ALPACA_TEMPLATE_NO_INPUT.format(instruction=QUESTION)),
             ("custom", TEMPLATE.format(instruction=QUESTION)), ("old", TEMPLATE.format(instruction=QUESTION))]
    for name, rendered in cases:
        r = _run("--model", STORIES, "--adapter", work / name / "adapter", "--prompt", QUESTION,
                 "--max-new-tokens", 12, "--no-stream")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "prompt: the run's instruction template" in r.stderr
        # what the model saw: BOS + the rendered prompt, tokenized as training tokenizes it
        ids = [tok.bos_token_id] + tok(rendered, add_special_tokens=False)["input_ids"]
        want = _greedy_from_ids(work / name / "adapter", ids, 12)
        assert r.stdout.strip() == want.strip(), name
        assert r.stdout.startswith(tok.decode(ids, skip_special_tokens=True)), name
    r = _run("--model", STORIES, "--adapter", work / "custom" / "adapter", "--prompt", QUESTION,
             "--max-new-tokens", 12, "--no-stream", "--raw")
    assert r.returncode == 0 and "prompt: the prompt as it is" in r.stderr
    raw = _greedy_from_ids(work / "custom" / "adapter", tok(QUESTION)["input_ids"], 12)
    assert r.stdout.strip() == raw.strip() and not r.stdout.startswith("Q:")
