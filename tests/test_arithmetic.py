"""Training arithmetic that is exact (docs/DESIGN.md), pinned by invariants rather than "the loss fell".

Two launches of ``scripts/engine_probe.py`` (one process, then 2 ranks), each training several
runs one after another in the same processes, ZeRO-3 with ``stage3_param_persistence_threshold: 0``
so the 2-rank runs really partition every tensor:

- split invariance: the same 16 samples per update, as 1 rank x 16, 1 rank x 8 x accumulation 2
  and 2 ranks x 4 x accumulation 2, on variable-length instruction rows (padded) with warm-up and
  cosine, give the same adapter (relative difference of z-1 below 1e-4). The same runs on
  fixed-length rows measure the float noise floor. Weighting micro-batches equally (the old
  objective) moves the variable-length runs apart by ~1e-2.
- epochs end on an optimizer-step boundary: 94 rows (not a multiple of the global batch of 16),
  12 updates crossing two epoch boundaries, under the same three splits, give the same adapter;
  the dropped tail of each epoch (94 - 5 x 16 = 14 rows) is reported. When an epoch was counted
  in micro-batches, the accumulated splits put the epoch's tail into update 6 and the adapters
  differed by ~0.1 relative.
- the first update's LR: Adam's first step moves every coordinate by ~lr (m/sqrt(v) = sign(g)),
  so max |z-1| after one update is lr * f(0), not lr: warm-up applies to update 0.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, TINY_CONFIG, free_port, kill_group, read_metrics, run_train, start_train,
                     tail, train_env, train_records, wait_for)
from propulsion_ds.method.adapter import read_adapter_weights
from propulsion_ds.train.ds_engine import lr_lambda

pytestmark = pytest.mark.slow

PROBE = ROOT / "scripts" / "engine_probe.py"
STEPS, LR, WARMUP = 6, 0.01, 2
SPLITS = {"1x16": (16, 1, 1), "1x8x2": (8, 2, 1), "2x4x2": (4, 2, 2)}     # micro, accum, ranks
SPLIT_TOL = 1e-4
EPOCH_ROWS, EPOCH_STEPS = 94, 12          # 5 updates of 16 per epoch: two epoch boundaries crossed


def zero3_partitioned(tmp_path: Path) -> Path:
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partitioned.json"
    path.write_text(json.dumps(ds))
    return path


def fixed_length_text(path: Path, n: int = 200, words: int = 40, min_words: int | None = None) -> Path:
    """Documents of one length in tokens: single-token words, so every row is max_length long;
    with ``min_words``, each document has between ``min_words`` and ``words`` words."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "stories260K")
    vocab = [w for w in ("the", "cat", "dog", "sun", "big", "red", "ran", "sat", "hat", "box", "day", "fun")
             if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n):
            length = words if min_words is None else int(torch.randint(min_words, words + 1, (1,), generator=g))
            idx = torch.randint(len(vocab), (length,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(vocab[i] for i in idx)}) + "\n")
    return path


def probe(tmp_path: Path, name: str, runs: list, nproc: int) -> dict:
    runs_file = tmp_path / f"{name}.runs.json"
    runs_file.write_text(json.dumps(runs))
    reports = tmp_path / "reports"
    args = [str(PROBE), "--config", str(TINY_CONFIG), "--runs", str(runs_file), "--report-dir", str(reports)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())] if nproc > 1 else [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return {"log": proc.stderr}


def z_minus_1(out: Path) -> torch.Tensor:
    weights = read_adapter_weights(out / "adapter")
    return torch.cat([v.flatten() for _, v in sorted(weights.items()) if not _.startswith("bias.")]) - 1.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arith")
    ds = zero3_partitioned(tmp)
    fixed = fixed_length_text(tmp / "fixed.jsonl")
    varied = fixed_length_text(tmp / "varied.jsonl", n=EPOCH_ROWS, min_words=8)     # rows of 10-42 tokens
    data = {"var": ["data.train=" + str(ROOT / "assets" / "data" / "self_instruct.jsonl"),
                    "data.format=instruction", "data.max_length=128", "data.packing=false"],
            "fix": [f"data.train={fixed}", "data.format=text", "data.max_length=42", "data.packing=false"],
            "epoch": [f"data.train={varied}", "data.format=text", "data.max_length=42", "data.packing=false",
                      f"train.max_steps={EPOCH_STEPS}"]}     # the later max_steps wins
    common = [f"deepspeed={ds}", "data.eval_fraction=0", f"train.max_steps={STEPS}", f"train.lr={LR}",
              f"train.warmup_steps={WARMUP}", "train.schedule=cosine", "train.seed=7",
              "checkpoint.every_steps=1000", "eval.every_steps=1000", "model.dtype=fp32"]

    def run(kind, split):
        micro, accum, _ = SPLITS[split]
        return {"name": f"{kind}_{split}", "overrides": common + data[kind] + [
            f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={accum}",
            f"output_dir={tmp / f'{kind}_{split}'}"]}

    one = [run(k, s) for k in data for s in ("1x16", "1x8x2")]
    one.append({"name": "first_update", "overrides": common + data["var"] + [
        "train.max_steps=1", "train.warmup_steps=10", "train.micro_batch_size=4", f"output_dir={tmp / 'first'}"]})
    logs = {"one": probe(tmp, "one", one, 1)["log"],
            "two": probe(tmp, "two", [run(k, "2x4x2") for k in data], 2)["log"]}
    return tmp, logs


def test_two_rank_runs_really_partition_every_tensor(runs):
    _, logs = runs
    lines = re.findall(r"ZeRO-3 partitioning: (\d+) of (\d+) parameter tensors partitioned; this rank holds "
                       r"(\d+) of (\d+) elements", logs["two"])
    assert lines, tail(logs["two"])
    split, total, held, full = map(int, lines[0])
    assert split == total > 0 and held < full, lines[0]


def test_the_same_samples_split_differently_give_the_same_update(runs):
    tmp, _ = runs
    rel = {}
    for kind in ("var", "fix"):
        z = {s: z_minus_1(tmp / f"{kind}_{s}") for s in SPLITS}
        assert float(z["1x16"].abs().max()) > 1e-3            # the vectors moved
        rel[kind] = {s: float((z[s] - z["1x16"]).norm() / z["1x16"].norm()) for s in ("1x8x2", "2x4x2")}
    print("relative difference of z-1 against 1 rank x 16:", rel)
    for kind in rel:
        for split, r in rel[kind].items():
            assert r < SPLIT_TOL, f"{kind} rows, {split}: relative difference {r:.2e} (noise floor {rel['fix']})"
    # the logged loss is the optimised quantity: one value per update whatever the split
    losses = {s: [r["loss"] for r in train_records(read_metrics(tmp / f"var_{s}"))] for s in SPLITS}
    for s in ("1x8x2", "2x4x2"):
        assert losses[s] == pytest.approx(losses["1x16"], rel=1e-5), (s, losses)


def test_epochs_end_on_an_update_boundary_under_every_split(runs):
    """The same samples form each update across epoch boundaries, whatever the split, and the
    tail an epoch drops (fewer rows than one global batch) is said in the log."""
    tmp, logs = runs
    z = {s: z_minus_1(tmp / f"epoch_{s}") for s in SPLITS}
    assert float(z["1x16"].abs().max()) > 1e-3
    rel = {s: float((z[s] - z["1x16"]).norm() / z["1x16"].norm()) for s in ("1x8x2", "2x4x2")}
    print("epoch runs, relative difference of z-1 against 1 rank x 16:", rel)
    for split, r in rel.items():
        assert r < SPLIT_TOL, f"{split}: relative difference {r:.2e} across the epoch boundaries"
    steps = {s: [r["step"] for r in train_records(read_metrics(tmp / f"epoch_{s}"))] for s in SPLITS}
    assert all(v == list(range(1, EPOCH_STEPS + 1)) for v in steps.values()), steps
    for log in logs.values():
        said = re.findall(r"data: (\d+) training rows, (\d+) updates of (\d+) samples per epoch; "
                          r"(\d+) rows per epoch left out", log)
        assert said, tail(log)
        for rows, updates, batch, left in map(lambda t: tuple(map(int, t)), said):
            assert left == rows - updates * batch and 0 <= left < batch
        assert (EPOCH_ROWS, EPOCH_ROWS // 16, 16, EPOCH_ROWS % 16) in {tuple(map(int, t)) for t in said}


def test_warm_up_applies_to_the_first_update(runs):
    tmp, _ = runs
    expected = LR * lr_lambda("cosine", 10, 1)(0)              # 1e-3: a tenth of train.lr
    z = z_minus_1(tmp / "first")
    assert float(z.abs().max()) == pytest.approx(expected, rel=1e-3)
    record, = train_records(read_metrics(tmp / "first"))
    assert record["lr"] == pytest.approx(expected, rel=1e-12)


def test_lr_trace_with_warm_up_across_a_kill_and_resume(tmp_path):
    """Each update's logged LR is lr * f(s) for s = 0, 1, ... (read before the step), and a run
    SIGKILLed after its step-3 checkpoint and resumed logs the same trace."""
    steps, warmup = 8, 4
    out = tmp_path / "out"
    args = ["--config", TINY_CONFIG, "--set", f"output_dir={out}", "--set", f"train.max_steps={steps}",
            "--set", f"train.warmup_steps={warmup}", "--set", "train.schedule=cosine", "--set", f"train.lr={LR}",
            "--set", "checkpoint.every_steps=3", "--set", "eval.every_steps=100", "--set", "eval.max_batches=1",
            "--set", "train.micro_batch_size=2", "--set", "data.max_length=32"]
    proc = start_train(args, nproc=1)
    try:
        wait_for(lambda: (out / "checkpoints" / "step_3").is_dir(), proc, timeout=300)
    finally:
        kill_group(proc)
    resumed = run_train(args + ["--resume"], nproc=1)
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert "resumed from" in resumed.stderr
    f = lr_lambda("cosine", warmup, steps)
    trace = [(r["step"], r["lr"]) for r in train_records(read_metrics(out))]
    assert [s for s, _ in trace] == list(range(1, steps + 1))
    for step, lr in trace:
        assert lr == pytest.approx(LR * f(step - 1), rel=1e-12), (step, lr, LR * f(step - 1))
