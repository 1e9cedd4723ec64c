"""Run the real ``propulsion_ds.train.recipe.Trainer`` in-process and dump what a test needs to see.

    torchrun --nproc_per_node 2 --master_port 29710 scripts/engine_probe.py \
        --config configs/tiny.json --runs runs.json --report-dir /tmp/reports

``runs.json`` is a list of ``{"name": str, "overrides": ["a.b=v", ...]}``. Every run is trained in
the same processes, one after another (start-up — imports, process group — is paid once). For
each run and rank, ``<report-dir>/<name>.rank<R>.json`` holds:

- ``file_sha256`` / ``before_sha256`` / ``after_sha256``: sha256 over every frozen parameter (in
  name order) as read from the model's ``model.safetensors`` cast to the run's dtype, as held by
  the model after ``setup()`` (i.e. after ``deepspeed.initialize``), and after ``train()``; ZeRO-3
  parameters are gathered with ``deepspeed.zero.GatheredParameters``. ``changed_after`` lists the
  frozen parameters whose values differ from the file after training.
- ``optimizer``: the wrapper chain from ``engine.optimizer`` down to the torch optimizer, and the
  numel and bytes this rank holds of fp32 master params and of each state tensor (exp_avg,
  exp_avg_sq), and the optimizer's own step counters (``steps``).
- ``trainable``, ``frozen_count``, ``history`` (the records the trainer logged), and the final
  fp32 ``delta`` statistics (``delta_nonzero``, ``delta_absmax``).

A library error in one run is written to ``<name>.rank<R>.error`` and the probe exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from launch.common import setup_logging


def _frozen(model, delta_name):
    return [(n, p) for n, p in model.named_parameters() if n != delta_name and not p.requires_grad]


def _sha(tensors) -> str:
    """sha256 over (name, raw bytes) pairs; bytes, so bf16 values hash exactly."""
    import torch

    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_tensors(model_dir: str, names, dtype) -> dict:
    from safetensors.torch import load_file

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    return {n: sd[n].to(dtype) for n in names}


def model_tensors(model, delta_name) -> dict:
    """Frozen parameters, whole (gathered under ZeRO-3), cloned to CPU. Collective under ZeRO-3."""
    import deepspeed

    frozen = _frozen(model, delta_name)
    params = [p for _, p in frozen if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext():
        return {n: p.detach().clone().cpu() for n, p in frozen}


def optimizer_facts(engine) -> dict:
    import torch

    chain, opt = [], engine.optimizer
    while True:
        chain.append(type(opt).__name__)
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    facts = {"chain": chain, "torch_optimizer": isinstance(opt, torch.optim.Optimizer),
             "master_numel": 0, "master_bytes": 0, "master_dtypes": [], "state": {}, "steps": []}
    # The fp32 masters: the tensors the torch optimizer steps. ZeRO-3 puts its flat fp32 partition
    # into param_groups only for the duration of a step, so take the state's keys too.
    masters = {id(p): p for g in opt.param_groups for p in g["params"]}
    masters.update({id(p): p for p in opt.state.keys() if torch.is_tensor(p)})
    for p in masters.values():
        facts["master_numel"] += p.numel()
        facts["master_bytes"] += p.numel() * p.element_size()
        facts["master_dtypes"].append(str(p.dtype))
        for key, value in opt.state.get(p, {}).items():
            if key == "step":
                facts["steps"].append(int(value.item() if torch.is_tensor(value) else value))
            if torch.is_tensor(value) and key in ("exp_avg", "exp_avg_sq"):
                s = facts["state"].setdefault(key, {"numel": 0, "bytes": 0, "dtypes": []})
                s["numel"] += value.numel()
                s["bytes"] += value.numel() * value.element_size()
                s["dtypes"].append(str(value.dtype))
    facts["master_dtypes"] = sorted(set(facts["master_dtypes"]))
    facts["steps"] = sorted(set(facts["steps"]))
    for s in facts["state"].values():
        s["dtypes"] = sorted(set(s["dtypes"]))
    return facts


def probe_one(run: dict, args) -> dict:
    import torch
    from propulsion_ds.config.load import load_config
    from propulsion_ds.train.checkpointer import full_delta
    from propulsion_ds.train.recipe import Trainer
    from propulsion_ds.model import DTYPES
    from propulsion_ds.method.propulsion import DELTA_NAME

    cfg = load_config(args.config, run["overrides"])
    trainer = Trainer(cfg, overwrite=True)
    try:
        trainer.setup()
        model = trainer.model
        dtype = DTYPES[cfg.model.dtype]
        names = [n for n, _ in _frozen(model, DELTA_NAME)]
        from_file = file_tensors(cfg.model.name_or_path, names, dtype)
        before = model_tensors(model, DELTA_NAME)
        history = trainer.train()
        after = model_tensors(model, DELTA_NAME)
        delta = full_delta(trainer.model)
        report = {
            "name": run["name"], "rank": trainer.rank, "world": trainer.world,
            "stage": trainer.ds_config.get("zero_optimization", {}).get("stage", 0),
            "dtype": cfg.model.dtype, "trainable": trainer.trainable,
            "frozen_count": sum(t.numel() for t in after.values()),
            "frozen_names": len(names),
            "file_sha256": _sha(sorted(from_file.items())),
            "before_sha256": _sha(sorted(before.items())),
            "after_sha256": _sha(sorted(after.items())),
            "changed_before": sorted(n for n in names if not torch.equal(before[n], from_file[n])),
            "changed_after": sorted(n for n in names if not torch.equal(after[n], from_file[n])),
            "model_dtypes": sorted({str(t.dtype) for t in after.values()}),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "optimizer": optimizer_facts(trainer.engine),
            "delta_numel": delta.numel(),
            "delta_nonzero": int((delta != 0).sum()),
            "delta_absmax": float(delta.abs().max()),
            "history": history,
        }
        return report
    finally:
        trainer.cleanup()
        engine = getattr(trainer, "engine", None)
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        try:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
        except ImportError:
            pass
        del trainer
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--runs", required=True, help="JSON file: [{name, overrides}]")
    p.add_argument("--report-dir", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_logging()
    runs = json.loads(Path(args.runs).read_text())
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for run in runs:
        try:
            report = probe_one(run, args)
        except Exception:
            (out / f"{run['name']}.rank{rank}.error").write_text(traceback.format_exc())
            raise
        tmp = out / f"{run['name']}.rank{rank}.json.tmp"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out / f"{run['name']}.rank{rank}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
