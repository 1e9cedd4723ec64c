"""Resume refuses other batch, seed and data settings (issue 9): the data position and RNG state
in a checkpoint mean nothing under them. One process trains a short run with a minimal DeepSpeed
section ({"zero_optimization": {"stage": 3}}, no batch keys), then tries to resume it once per
fingerprint field with that field changed; the real CLI checks one of them end to end (exit 2,
one line, no traceback)."""
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
        try:
            engine.run(load_config(config, common + [f"{field}={value}", "resume=true"]))
            result = None
        except CheckpointError as e:
            result = str(e)
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
    return tmp, common, other


CASES = [("train.micro_batch_size", 4), ("train.gradient_accumulation_steps", 2), ("train.seed", 43),
         ("data.format", "instruction"), ("data.max_length", 200), ("data.packing", "false")]


def test_resume_with_other_batch_seed_or_data_settings_is_refused_naming_the_field(trained):
    tmp, common, other = trained
    cases = CASES + [("data.train", str(other))]
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(TINY_CONFIG), json.dumps(common), json.dumps(cases)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    # the minimal DeepSpeed section trained (batch keys filled from train) and checkpointed
    assert (tmp / "out" / "checkpoints" / "step_2").is_dir()
    results = dict(json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE "))
    assert set(results) == {f for f, _ in cases}
    for field, message in results.items():
        assert message is not None, f"resume with another {field} was accepted"
        assert f"written with {field}=" in message and message.splitlines() == [message], message


def test_cli_refusal_is_one_line_with_exit_2(trained):
    tmp, common, _ = trained
    args = ["--config", TINY_CONFIG, "--resume"]
    for item in common + ["train.seed=44"]:
        args += ["--set", item]
    proc = run_train(args, nproc=1)
    assert proc.returncode == 2, tail(proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.seed=" in errors[0] and "Traceback" not in proc.stderr, tail(proc.stderr)
