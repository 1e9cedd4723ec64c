"""``eval.metric: "choice"`` in the trainer: one real 2-rank ZeRO-3 run (torchrun, gloo) on
stories260K with two eval files of commonsense rows (15 questions: the shards are uneven, so
a rank without the dummy forward would hang in ZeRO-3's gathers), in the text answer format. The
per-file accuracies in metrics.jsonl and TensorBoard equal ``score_questions`` run in this process
on the saved adapter; the training rows were built in the text format too."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import MODEL_DIR, ROOT, read_metrics, run_cli, run_train, tail

pytestmark = pytest.mark.slow

FIX = Path(__file__).resolve().parent / "fixtures" / "commonsense"
STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choice_train")
    shutil.copy(FIX / "boolq_dev.jsonl", tmp / "boolq_dev.jsonl")
    lines = (FIX / "arc_easy_dev.jsonl").read_text().splitlines()[:7]
    (tmp / "arc_easy_dev.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {
        "model": {"name_or_path": str(MODEL_DIR), "dtype": "fp32", "gradient_checkpointing": False},
        "propulsion": {"degree": 15, "targets": "all-linear"},
        "data": {"train": str(FIX / "*_dev.jsonl"),
                 "eval": [str(tmp / "boolq_dev.jsonl"), str(tmp / "arc_easy_dev.jsonl")],
                 "format": "instruction", "max_length": 1024, "packing": False, "cache_dir": str(tmp / "cache")},
        "train": {"lr": 0.02, "max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                  "seed": 1},
        "eval": {"every_steps": STEPS, "max_batches": 2, "metric": "choice", "answer_format": "text"},
        "checkpoint": {"every_steps": 100, "keep_last": 1},
        "output_dir": str(tmp / "out"),
        "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json"),
    }
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    proc = run_train(["--config", tmp / "cfg.json"], nproc=2, timeout=900)
    assert proc.returncode == 0, tail(proc.stderr)
    return tmp, cfg


def _eval_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "eval_loss" in r]


def test_accuracy_per_file_in_metrics_and_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = run
    recs = _eval_records(tmp / "out")
    assert [r["step"] for r in recs] == [0, STEPS]
    acc = EventAccumulator(str(tmp / "out" / "tensorboard"))
    acc.Reload()
    for tag in ("eval/choice_accuracy", "eval/choice_accuracy/boolq_dev", "eval/choice_accuracy/arc_easy_dev"):
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        for r in recs:
            assert 0.0 <= r[tag] <= 1.0
            assert tb[r["step"]] == pytest.approx(r[tag], abs=1e-6)
    for r in recs:   # 8 + 7 questions: the overall accuracy weighs the files by their questions
        assert r["eval/choice_accuracy"] == pytest.approx(
            (8 * r["eval/choice_accuracy/boolq_dev"] + 7 * r["eval/choice_accuracy/arc_easy_dev"]) / 15)


def test_accuracy_equals_in_process_scoring_of_the_adapter(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from propulsion_ds.config import RunConfig  # noqa: F401  (the schema the run used)
    from propulsion_ds.eval.choice import build_questions, score_questions
    from propulsion_ds.method.adapter import load_adapter

    tmp, cfg = run
    last = _eval_records(tmp / "out")[-1]
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    load_adapter(model, tmp / "out" / "adapter")
    qs = []
    for path in cfg["data"]["eval"]:
        rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
        qs += build_questions(rows, None, "text", Path(path).stem)
    res = score_questions(model, tok, qs, answer_format="text")
    assert res.total == 15
    assert last["eval/choice_accuracy"] == pytest.approx(res.accuracy)
    for stem, a in res.per_source.items():
        assert last[f"eval/choice_accuracy/{stem}"] == pytest.approx(a)
    # the run trained on rows rewritten to name the option's text (the cache is keyed by it)
    (meta,) = (tmp / "cache").glob("*/meta.json")
    assert json.loads(meta.read_text())["fingerprint"]["settings"]["answer_format"] == "text"


def test_bad_choice_configs_fail_in_one_line(tmp_path):
    base = {"model": {"name_or_path": str(MODEL_DIR)}, "data": {"train": str(FIX / "boolq_dev.jsonl"),
            "format": "instruction"}, "train": {"max_steps": 1}, "output_dir": str(tmp_path / "out"),
            "eval": {"metric": "choice"}}
    cases = [({}, 'eval.metric: "choice" scores the data.eval files; set data.eval'),
             ({"eval": {"metric": "choice", "answer_format": "words"}}, "eval.answer_format: expected one of label, text"),
             ({"data": {**base["data"], "format": "text"}}, 'eval.metric: "choice" needs data.format "instruction"')]
    for i, (patch, want) in enumerate(cases):
        path = tmp_path / f"cfg{i}.json"
        path.write_text(json.dumps({**base, **patch}))
        proc = run_cli("train", "--config", path, timeout=300)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2, proc.stderr
        assert want in lines[-1], lines[-1:]
