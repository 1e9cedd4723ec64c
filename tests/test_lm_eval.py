"""The shipped lm-evaluation-harness tasks (propulsion_ds/eval/lm_eval_tasks) score exactly what the
trainer's ``eval.metric: "choice"`` scores: the same contexts and continuations token for token,
and, on a trained stories260K adapter exported to peft (and merged), the same accuracy per file
in both answer formats. lm-eval runs as users run it: ``lm_eval run`` in a subprocess, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MODEL_DIR, ROOT, read_metrics, run_cli, run_train, tail, train_env

pytestmark = pytest.mark.slow

FIX = Path(__file__).resolve().parent / "fixtures" / "commonsense"
TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
TASK_DIR = ROOT / "propulsion_ds" / "eval" / "lm_eval_tasks"


def _lm_eval(model_args: str, tasks: str, out: Path) -> dict:
    """``lm_eval run`` on the fixture files; {task: acc}."""
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
           "--tasks", tasks, "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "8",
           "--metadata", json.dumps({"data_dir": str(FIX)}), "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, tail(proc.stderr)
    (res,) = list(out.rglob("results_*.json"))
    results = json.loads(res.read_text())["results"]
    return {task: v["acc,none"] for task, v in results.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps on the fixture rows (1 rank), eval.metric choice; the adapter exported to peft and merged."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    evals = [str(FIX / f"{t}_dev.jsonl") for t in TASKS]
    cfg = {
        "model": {"name_or_path": str(MODEL_DIR), "dtype": "fp32", "gradient_checkpointing": False},
        "propulsion": {"degree": 15, "targets": "all-linear"},
        "data": {"train": evals, "eval": evals, "format": "instruction", "max_length": 1024, "packing": False,
                 "cache_dir": str(tmp / "cache")},
        "train": {"lr": 0.02, "max_steps": 3, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "seed": 3},
        "eval": {"every_steps": 3, "max_batches": 1, "metric": "choice"},
        "checkpoint": {"every_steps": 100, "keep_last": 1},
        "output_dir": str(tmp / "out"),
        "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json"),
    }
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    proc = run_train(["--config", tmp / "cfg.json"], nproc=1, timeout=900)
    assert proc.returncode == 0, tail(proc.stderr)
    # the adapter keeps how its prompts were rendered (launch/generate.py applies it)
    meta = json.loads((tmp / "out" / "adapter" / "propulsion_config.json").read_text())
    assert meta["prompt"] == {"format": "instruction", "template": None}
    proc = run_cli("export", "--adapter", tmp / "out" / "adapter", "--to", "peft", "--out", tmp / "peft")
    assert proc.returncode == 0, tail(proc.stderr)
    proc = run_cli("merge", "--base", MODEL_DIR, "--adapter", tmp / "out" / "adapter", "--out", tmp / "merged",
                   "--no-progress")
    assert proc.returncode == 0, tail(proc.stderr)
    return tmp


def _ours(adapter_dir, fmt: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from propulsion_ds.eval.choice import build_questions, score_questions
    from propulsion_ds.method.adapter import load_adapter

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    qs = []
    for t in TASKS:
        rows = [json.loads(x) for x in (FIX / f"{t}_dev.jsonl").read_text().splitlines()]
        qs += build_questions(rows, None, fmt, t)
    return score_questions(model, tok, qs, answer_format=fmt).per_source


def test_contexts_and_continuations_are_the_trained_tokens():
    """lm-eval's split of each request into context and continuation tokens is ours: the context is
    BOS + the prompt without its final "\\n", the continuation that "\\n" + the completion's tokens;
    the text tasks' extra choice (the "\\n" alone) is exactly that one token."""
    import importlib.util

    from lm_eval.models.huggingface import HFLM

    from propulsion_ds.eval.choice import build_questions, encode_candidates

    spec = importlib.util.spec_from_file_location("propulsion_lm_eval_utils", TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    lm = HFLM(pretrained=str(MODEL_DIR), device="cpu", dtype="float32")
    tok = lm.tokenizer
    for fmt in ("label", "text"):
        docs = utils.load("openbookqa", fmt, data_dir=str(FIX), pretrained=str(MODEL_DIR))["test"]
        rows = [json.loads(x) for x in (FIX / "openbookqa_dev.jsonl").read_text().splitlines()]
        for doc, q in zip(docs, build_questions(rows, None, fmt, "openbookqa")):
            choices = utils.doc_to_choice(doc)
            assert len(choices) == len(q.completions) + (fmt == "text")
            for (ids, start), choice in zip(encode_candidates(tok, q), choices):
                ctx, cont = lm._encode_pair(utils.doc_to_text(doc), choice)
                assert ctx + cont == ids
                assert cont[1:] == ids[start:] and len(ctx) == start - 1
            assert doc["n_tokens"] == [len(i) - s for i, s in encode_candidates(tok, q)]
            if fmt == "text":
                ctx, cont = lm._encode_pair(utils.doc_to_text(doc), choices[-1])
                assert ctx + cont == ids[:start]


def test_process_results_picks_what_score_questions_picks():
    """lm-eval's log-likelihoods of every choice, through the tasks' process_results, pick per
    question what score_questions picks (text: the shared "\\n" term removed, mean per token)."""
    import importlib.util

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from propulsion_ds.eval.choice import build_questions, score_questions

    spec = importlib.util.spec_from_file_location("propulsion_lm_eval_utils", TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    lm = HFLM(pretrained=str(MODEL_DIR), device="cpu", dtype="float32", batch_size=8)
    for fmt in ("label", "text"):
        for t in ("arc_easy", "openbookqa"):
            docs = utils.load(t, fmt, data_dir=str(FIX), pretrained=str(MODEL_DIR))["test"]
            rows = [json.loads(x) for x in (FIX / f"{t}_dev.jsonl").read_text().splitlines()]
            qs = build_questions(rows, None, fmt, t)
            for doc, q in zip(docs, qs):
                reqs = [Instance("loglikelihood", doc, (utils.doc_to_text(doc), c), i)
                        for i, c in enumerate(utils.doc_to_choice(doc))]
                got = utils.process_results(doc, lm.loglikelihood(reqs, disable_tqdm=True))["acc"]
                want = score_questions(lm.model, lm.tokenizer, [q], answer_format=fmt).correct
                assert got == want, (fmt, t, q.prompt[-80:])


def test_lm_eval_on_the_peft_export_equals_the_trainer(trained):
    tmp = trained
    last = [r for r in read_metrics(tmp / "out") if "eval_loss" in r][-1]
    acc = _lm_eval(f"pretrained={MODEL_DIR},peft={tmp / 'peft'},dtype=float32",
                   "propulsion_commonsense_label,propulsion_commonsense_text", tmp / "lm_peft")
    text = _ours(tmp / "out" / "adapter", "text")
    for t in TASKS:
        # label: the trainer's own eval of this adapter (2-rank agreement: tests/test_choice_train.py)
        assert acc[f"propulsion_{t}_label"] == pytest.approx(last[f"eval/choice_accuracy/{t}_dev"]), t
        assert acc[f"propulsion_{t}_text"] == pytest.approx(text[t]), t
    assert acc["propulsion_commonsense_label"] == pytest.approx(last["eval/choice_accuracy"])
    # the adapter moved the picks (so agreement says the export was applied): another accuracy than the base's
    assert _ours(None, "text") != text or _ours(None, "label") != _ours(tmp / "out" / "adapter", "label")


def test_lm_eval_on_the_merged_model_equals_the_trainer(trained):
    tmp = trained
    last = [r for r in read_metrics(tmp / "out") if "eval_loss" in r][-1]
    acc = _lm_eval(f"pretrained={tmp / 'merged'},dtype=float32", "propulsion_commonsense_label", tmp / "lm_merged")
    for t in TASKS:
        assert acc[f"propulsion_{t}_label"] == pytest.approx(last[f"eval/choice_accuracy/{t}_dev"]), t
