"""What a resume may change, and what it refuses (propulsion_ds.train.checkpointer.fingerprint).

Refused, in one line naming the field: the settings that define the trajectory (seed, data and
their contents, dtype, attention kernel, the global batch) - the data position, RNG state and
optimizer state in a checkpoint mean nothing under them. A change of the global batch names the
factor of micro_batch_size x ranks x accumulation that changed. Accepted: another split of the same
global batch, and the settings a user changes on purpose (train.lr here), logged once.

One process trains a short run with a minimal DeepSpeed section ({"zero_optimization": {"stage":
3}}, no batch keys), then tries to resume it once per case; the real CLI checks one refusal end to
end (exit 2, one line, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, TINY_CONFIG, run_train, tail, train_env

pytestmark = pytest.mark.slow

HARNESS = textwrap.dedent("""
    import json, sys
    from launch.common import setup_logging
    from propulsion_ds.train import recipe as engine
    from propulsion_ds.train.checkpoint import CheckpointError
    from propulsion_ds.config.load import load_config
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    setup_logging()
    config, common, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    engine.run(load_config(config, common))
    unset_hf_deepspeed_config()
    for field, value in cases:
        # "data.contents": the data file rewritten in place at the same size (and restored)
        sets = [] if field == "data.contents" else [f"{f}={v}" for f, v in zip(field.split("+"), str(value).split("+"))]
        original = open(value, "rb").read() if field == "data.contents" else None
        if original is not None:
            open(value, "wb").write(original.replace(b"cat", b"cot", 1))
        try:
            engine.run(load_config(config, common + sets + ["resume=true"]))
            result = None
        except CheckpointError as e:
            result = str(e)
        finally:
            if original is not None:
                open(value, "wb").write(original)
        unset_hf_deepspeed_config()
        print("CASE " + json.dumps([field, result]), flush=True)
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp")
    rows = [{"text": f"Line {i}: " + "the cat sat on the mat. " * (3 + i % 5), "instruction": f"Count to {i}.",
             "output": " ".join(str(j) for j in range(i % 7 + 2))} for i in range(120)]
    both = tmp / "both.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    common = [f"output_dir={tmp / 'out'}", f"data.train={both}", "data.format=text", "data.max_length=256",
              "data.eval_fraction=0", "train.max_steps=2", "train.micro_batch_size=2", "eval.every_steps=100",
              "checkpoint.every_steps=1", 'deepspeed={"zero_optimization": {"stage": 3}}']
    cases = REFUSED + BATCH + ACCEPTED + [("data.train", str(other)), ("data.contents", str(both))]
    # trains the run, then tries each case: every test here reads this one run
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(TINY_CONFIG), json.dumps(common), json.dumps(cases)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    return tmp, common, cases, proc


REFUSED = [("train.seed", 43), ("data.format", "instruction"), ("data.max_length", 200), ("data.packing", "false"),
           ("model.dtype", "bf16"), ("model.attn_implementation", "eager"), ("eval.answer_format", "text")]
# the global batch (2 samples: 2 x 1 rank x 1) changed by one factor or another
BATCH = [("train.micro_batch_size", 4), ("train.gradient_accumulation_steps", 2)]
ACCEPTED = [("train.micro_batch_size+train.gradient_accumulation_steps", "1+2"), ("train.lr", 0.01)]


def test_resume_refuses_trajectory_changes_naming_the_field_and_accepts_the_rest(trained):
    tmp, common, cases, proc = trained
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    # the minimal DeepSpeed section trained (batch keys filled from train) and checkpointed
    assert (tmp / "out" / "checkpoints" / "step_2").is_dir()
    results = dict(json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE "))
    assert set(results) == {f for f, _ in cases}
    for field, _ in REFUSED + [("data.train", None), ("data.contents", None)]:
        message = results[field]
        assert message is not None, f"resume with another {field} was accepted"
        assert f"written with {field}=" in message and message.splitlines() == [message], message
    for field, value in BATCH:
        message = results[field]
        assert message is not None, f"resume with another {field} was accepted"
        assert message.splitlines() == [message] and "written with a global batch of 2 samples" in message, message
        assert "this run has 4 (" in message and f"{field}={value}" in message, message
        assert message.count(" changed the product") == 1 and f": {field} changed the product" in message, message
    for field, _ in ACCEPTED:
        assert results[field] is None, results[field]
    # the changed setting is logged once, from the resumed step
    assert proc.stderr.count("step 2: train.lr 0.002 -> 0.01") == 1, tail(proc.stderr)


def test_cli_refusal_is_one_line_with_exit_2(trained):
    tmp, common, _, proc = trained
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    args = ["--config", TINY_CONFIG, "--resume"]
    for item in common + ["train.seed=44"]:
        args += ["--set", item]
    proc = run_train(args, nproc=1)
    assert proc.returncode == 2, tail(proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.seed=" in errors[0] and "Traceback" not in proc.stderr, tail(proc.stderr)
