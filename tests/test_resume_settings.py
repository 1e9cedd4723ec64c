"""What a resume may change takes effect from the resumed step (real trainer, one rank, ZeRO-3).

One run of 4 updates (linear decay to 0 over 4, lr 0.01, no weight decay) is resumed three times,
each from a copy of its output_dir:

- ``max_steps`` raised to 8: the first resumed update's LR is lr * f(4) of the new schedule
  (0.005), not the old schedule's end (0.0, what DeepSpeed's restored param groups hold), and the
  rest of the trace follows the new schedule;
- ``lr`` lowered to 0.001 and ``max_grad_norm`` to 0.5, with ``weight_decay`` 0.1 and with
  ``weight_decay`` 0: each change is logged once, every resumed LR is the new lr's schedule, and
  the decayed adapter is pulled toward z = 1 (DeepSpeed restores the checkpoint's weight decay,
  which would make the two runs identical).
"""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from helpers import TINY_CONFIG, read_metrics, run_train, tail, train_records
from propulsion_ds.method.adapter import read_adapter_weights
from propulsion_ds.train.ds_engine import lr_lambda

pytestmark = pytest.mark.slow

LR, STEPS, MORE = 0.01, 4, 8


def overrides(out, **kw) -> list:
    settings = {"output_dir": out, "train.max_steps": STEPS, "train.lr": LR, "train.warmup_steps": 0,
                "train.schedule": "linear", "train.weight_decay": 0.0, "checkpoint.every_steps": 2,
                "data.eval_fraction": 0, "train.micro_batch_size": 4, "data.max_length": 32}
    settings.update({k.replace("__", "."): v for k, v in kw.items()})
    args = ["--config", TINY_CONFIG]
    for k, v in settings.items():
        args += ["--set", f"{k}={v}"]
    return args


def z_minus_1(out) -> torch.Tensor:
    weights = read_adapter_weights(out / "adapter")
    return torch.cat([v.flatten() for k, v in sorted(weights.items()) if not k.endswith(".bias")]) - 1.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("settings") / "base"
    proc = run_train(overrides(out), nproc=1)
    assert proc.returncode == 0, tail(proc.stderr)
    return out


def resume(base, tmp_path, name, **kw):
    out = tmp_path / name
    shutil.copytree(base, out)
    proc = run_train(overrides(out, **kw) + ["--resume"], nproc=1)
    assert proc.returncode == 0, tail(proc.stderr)
    assert f"resumed from {out / 'checkpoints' / f'step_{STEPS}'}" in proc.stderr, tail(proc.stderr)
    return out, proc.stderr


def lr_trace(out) -> dict:
    return {r["step"]: r["lr"] for r in train_records(read_metrics(out))}


def test_raised_max_steps_first_resumed_update_follows_the_new_schedule(base, tmp_path):
    out, _ = resume(base, tmp_path, "longer", train__max_steps=MORE)
    trace = lr_trace(out)
    assert sorted(trace) == list(range(1, MORE + 1))
    old, new = lr_lambda("linear", 0, STEPS), lr_lambda("linear", 0, MORE)
    for step in range(1, STEPS + 1):
        assert trace[step] == pytest.approx(LR * old(step - 1), rel=1e-12), (step, trace)
    assert trace[STEPS + 1] == pytest.approx(LR * new(STEPS), rel=1e-12) and trace[STEPS + 1] > 0, trace
    for step in range(STEPS + 1, MORE + 1):
        assert trace[step] == pytest.approx(LR * new(step - 1), rel=1e-12), (step, trace)


def test_lowered_lr_and_weight_decay_apply_from_the_resumed_step(base, tmp_path):
    decayed, log = resume(base, tmp_path, "decayed", train__max_steps=MORE, train__lr=LR / 10,
                          train__weight_decay=0.1, train__max_grad_norm=0.5)
    plain, _ = resume(base, tmp_path, "plain", train__max_steps=MORE, train__lr=LR / 10, train__max_grad_norm=0.5)
    new = lr_lambda("linear", 0, MORE)
    for out in (decayed, plain):
        trace = lr_trace(out)
        for step in range(STEPS + 1, MORE + 1):
            assert trace[step] == pytest.approx(LR / 10 * new(step - 1), rel=1e-12), (step, trace)
    for change in ("train.lr 0.01 -> 0.001", "train.weight_decay 0 -> 0.1", "train.max_grad_norm 1 -> 0.5"):
        assert len(re.findall(f"step {STEPS}: {re.escape(change)}", log)) == 1, (change, tail(log))   # once
    # Decoupled decay scales each delta by (1 - lr_s * wd) per update s, toward z = 1; Adam's own
    # steps are all but the same in both runs, so the norms differ by sum_s lr_s * wd (1.25e-4).
    z_decayed, z_plain = z_minus_1(decayed), z_minus_1(plain)
    shrink = 0.1 * sum(LR / 10 * new(s) for s in range(STEPS, MORE))
    ratio = float(z_decayed.norm() / z_plain.norm())
    assert ratio == pytest.approx(1 - shrink, abs=0.2 * shrink), (ratio, 1 - shrink)
