"""launch/train.py as a user runs it (README.md "Errors"): one-line errors, the default job, its logs, generate.

- Bad input: ONE line on stderr, starting with "error:" and naming the field, exit code 2,
  nothing on stdout, output_dir not created — i.e. it failed before any data or model loaded
  (those log INFO lines to stderr) and before any process group.
- The default job: ``python launch/train.py --config configs/tiny.json`` (one process, ZeRO-3,
  150 steps) with only output_dir redirected. It is started first and runs while the error cases
  run beside it (2 cores); its final eval loss must beat the frozen base's (step 0), and its
  TensorBoard events are read back with tensorboard's EventAccumulator.
- ``launch/generate.py`` with that run's adapter, greedy and --sample, and greedy without it.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (MODEL_DIR, ROOT, TINY_CONFIG, TRAIN, Job, eval_records, read_metrics, run_cli, tail,
                     train_records)

pytestmark = pytest.mark.slow

DEFAULT_STEPS = 150                    # configs/tiny.json train.max_steps
DEFAULT_EVAL_EVERY = 50
GENERATE = ROOT / "launch" / "generate.py"
PROMPT = "Once upon a time"


def train_cmd(*args) -> list:
    return [sys.executable, TRAIN, "--config", *args]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def default_job(tmp):
    """The default job, started at once (single process); ``.result()`` waits for it."""
    out = tmp / "default"
    job = Job(train_cmd(TINY_CONFIG, "--set", f"output_dir={out}"), tmp, "default")
    job.output_dir = out
    yield job
    job.stop()


BAD_JSON = '{\n  "model": {"dtype": "fp32"},\n  "train": {"lr": 0.1,}\n}\n'

# name -> (extra args (callable of tmp dir), substrings the one error line must contain)
ERROR_CASES = {
    "unknown_key": (lambda t: ["--set", "train.lrr=1"], ["train.lrr", "did you mean 'train.lr'"]),
    "wrong_type": (lambda t: ["--set", "train.micro_batch_size=eight"],
                   ["train.micro_batch_size", "expected an integer"]),
    "wrong_type_in_file": (lambda t: [], ["train.lr", "expected a number"]),
    "out_of_range": (lambda t: ["--set", "train.lr=-0.5"], ["train.lr", "must be > 0"]),
    "missing_model_dir": (lambda t: ["--set", f"model.name_or_path={t / 'no_such_model'}"],
                          ["model.name_or_path", "no_such_model"]),
    "missing_data_file": (lambda t: ["--set", f"data.train={t / 'no_such.txt'}"], ["data.train", "no_such.txt"]),
    "max_steps_and_epochs": (lambda t: ["--set", "train.epochs=2"], ["train.max_steps", "train.epochs"]),
    "invalid_json": (lambda t: [], ["bad.json:3:", "invalid JSON"]),
    "resume_without_checkpoint": (lambda t: ["--resume"], ["--resume", "no complete checkpoint"]),
}


@pytest.fixture(scope="module")
def error_runs(tmp, default_job):
    """All error cases at once, in parallel (each is a short-lived process). ``default_job`` is
    requested first only so that it is already running beside them."""
    (tmp / "bad.json").write_text(BAD_JSON)
    typed = json.loads((TINY_CONFIG).read_text())
    typed["train"]["lr"] = "fast"
    (tmp / "typed.json").write_text(json.dumps(typed))
    jobs = {}
    for name, (extra, _) in ERROR_CASES.items():
        config = {"invalid_json": tmp / "bad.json", "wrong_type_in_file": tmp / "typed.json"}.get(name, TINY_CONFIG)
        out = tmp / f"out_{name}"
        jobs[name] = (Job(train_cmd(config, *extra(tmp), "--set", f"output_dir={out}"), tmp, name), out)
    results = {name: (job.result(timeout=300), out, job.wall) for name, (job, out) in jobs.items()}
    return results


def assert_one_line_error(proc: subprocess.CompletedProcess, needles) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout.strip() == "", proc.stdout[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_config_error_is_one_line_exit_2(error_runs, case):
    proc, out, wall = error_runs[case]
    line = assert_one_line_error(proc, ERROR_CASES[case][1])
    print(f"\n{case}: {wall:.1f} s: {line}")
    # Nothing was written: the run never got as far as preparing its output directory.
    assert not out.exists()


def test_refuses_to_overwrite_a_finished_run(default_job):
    done = default_job.result()
    assert done.returncode == 0, tail(done.stderr)
    out = default_job.output_dir
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = run_cli("train", "--config", TINY_CONFIG, "--set", f"output_dir={out}")
    assert_one_line_error(proc, [str(out), "finished run", "--resume", "--overwrite"])
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before, "a refused run touched the finished run's files"


# ------------------------------------------------------------------------------------ default job
@pytest.fixture(scope="module")
def default_run(default_job):
    done = default_job.result()
    assert done.returncode == 0, tail(done.stderr)
    print(f"\ndefault job (1 process, {DEFAULT_STEPS} steps): {default_job.wall:.1f} s")
    return default_job.output_dir


def test_default_job_beats_the_frozen_base(default_run):
    out = default_run
    records = read_metrics(out)
    train, evals = train_records(records), eval_records(records)
    assert [r["step"] for r in train] == list(range(1, DEFAULT_STEPS + 1))
    assert [r["step"] for r in evals] == list(range(0, DEFAULT_STEPS + 1, DEFAULT_EVAL_EVERY))
    base, final = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    print(f"\neval loss: step 0 (frozen base) {base:.4f} -> step {DEFAULT_STEPS} {final:.4f}")
    assert final < base - 0.5, (base, final)
    assert all(e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"])) for e in evals)
    for r in train:
        assert math.isfinite(r["loss"]) and r["grad_norm"] is not None and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["lr"] >= 0
    assert (out / "FINISHED").read_text().strip() == str(DEFAULT_STEPS)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{DEFAULT_STEPS}"
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == DEFAULT_STEPS
    from safetensors.torch import load_file
    z = load_file(str(out / "adapter" / "propulsion.safetensors"))
    assert len(z) == 35 and all(bool((v != 1).any()) for v in z.values())


def test_tensorboard_events(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(default_run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars, histograms = set(tags["scalars"]), set(tags["histograms"])
    want = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s",
            "memory/peak_mb_rank0", "eval/loss"}
    assert want <= scalars, want - scalars
    zk = sorted(t for t in scalars if t.startswith("propulsion/mean_abs_zk_minus_1/"))
    assert len(zk) == 5, zk                     # one per decoder layer of stories260K
    assert "propulsion/zk" in histograms

    metrics = read_metrics(default_run)
    loss = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(loss) == list(range(1, DEFAULT_STEPS + 1))
    assert all(loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in train_records(metrics))
    ev = {e.step: e.value for e in ea.Scalars("eval/loss")}
    assert ev == pytest.approx({r["step"]: r["eval_loss"] for r in eval_records(metrics)}, rel=1e-6)
    assert all(e.value > 0 for e in ea.Scalars("memory/peak_mb_rank0"))
    for tag in zk:                              # z = 1 at step 0, moved by the end
        values = {e.step: e.value for e in ea.Scalars(tag)}
        assert values[0] == 0 and values[DEFAULT_STEPS] > 0, (tag, values)
    hist = {h.step: h.histogram_value for h in ea.Histograms("propulsion/zk")}
    assert sorted(hist) == list(range(0, DEFAULT_STEPS + 1, DEFAULT_EVAL_EVERY))
    assert hist[0].min == hist[0].max == 1.0
    assert hist[0].num == 3000 and hist[DEFAULT_STEPS].num == 3000
    assert hist[DEFAULT_STEPS].min < 1.0 < hist[DEFAULT_STEPS].max


# ------------------------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def generations(default_run, tmp):
    adapter = default_run / "adapter"
    base = [sys.executable, GENERATE, "--model", MODEL_DIR, "--prompt", PROMPT, "--max-new-tokens", "40"]
    jobs = {"greedy": Job([*base, "--adapter", adapter], tmp, "gen_greedy"),
            "sample": Job([*base, "--adapter", adapter, "--sample", "--temperature", "0.8", "--top-p", "0.9"],
                          tmp, "gen_sample"),
            "base_greedy": Job(base, tmp, "gen_base")}
    return {k: j.result(timeout=300) for k, j in jobs.items()}


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_generate_with_the_trained_adapter(generations, mode):
    proc = generations[mode]
    assert proc.returncode == 0, tail(proc.stderr)
    text = proc.stdout.strip()
    print(f"\n{mode}: {text!r}")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 10, text


def test_generate_adapter_changes_the_output(generations):
    """Greedy decoding with the trained adapter differs from the base model's."""
    assert generations["base_greedy"].returncode == 0, tail(generations["base_greedy"].stderr)
    assert generations["greedy"].stdout.strip() != generations["base_greedy"].stdout.strip()
