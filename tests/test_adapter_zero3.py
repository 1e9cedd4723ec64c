"""train_bias under real ZeRO-3 partitioning (2 CPU ranks, gloo, persistence threshold 0): the
biases are partitioned, ``trained_biases`` (every rank) gathers their fp32 masters, and rank 0's
``save_adapter(model, dir, delta=full_fp32_delta, biases=...)`` - the engine's call - writes an
adapter whose reload reproduces the trained model's logits; without ``biases=`` it refuses in one
line instead of hanging or dropping them."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from helpers import ROOT, run_train, tail

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, os, sys, torch, deepspeed
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from deepspeed.utils import safe_get_full_fp32_param
    from helpers import tiny_qwen2                      # tests/ is on PYTHONPATH (see the test)
    from propulsion_ds import PropulsionConfig, inject, save_adapter
    from propulsion_ds.errors import AdapterError
    from propulsion_ds.method.gather import trained_biases, trained_bias_params
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = tiny_qwen2(seed=0, bias_std=0.1)
    if rank == 0:
        model.save_pretrained(os.path.join(out, "base"))
    inject(model, PropulsionConfig(degree=15, train_bias=True))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                      optimizer=torch.optim.Adam(params, lr=2e-2))
    bias = trained_bias_params(model)[0][1]
    partitioned = bias.ds_tensor.numel() < bias.ds_numel and bias.numel() == 0
    g = torch.Generator().manual_seed(rank)
    for step in range(6):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    delta_param = model.propulsion_delta
    delta = safe_get_full_fp32_param(delta_param).float().cpu().reshape(delta_param.ds_shape)
    biases = trained_biases(model)                       # collective: every rank
    refused = None
    if rank == 0:
        save_adapter(model, os.path.join(out, "adapter"), delta=delta, biases=biases)
        try:
            save_adapter(model, os.path.join(out, "adapter2"), delta=delta)
        except AdapterError as e:
            refused = str(e)
    engine.eval()
    ids = torch.arange(0, 20).reshape(2, 10)
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float()
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
        json.dump({"partitioned": bool(partitioned), "refused": refused,
                   "moved": max(float((b - 0).abs().max()) for b in biases.values())},
                  open(os.path.join(out, "result.json"), "w"))
''')


def test_engine_style_save_under_partitioned_zero3(tmp_path):
    from transformers import AutoModelForCausalLM
    from propulsion_ds import load_adapter

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    r = run_train([tmp_path], nproc=2, script=script, timeout=600,
                  env={"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    assert r.returncode == 0, tail(r.stderr)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["partitioned"], "the biases were not partitioned: the test would not see the gather"
    assert res["refused"] and "pass save_adapter(..., biases=...)" in res["refused"]
    assert not (tmp_path / "adapter2").exists()
    want = torch.load(tmp_path / "logits.pt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = model(input_ids=torch.arange(0, 20).reshape(2, 10)).logits
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        got = model(input_ids=torch.arange(0, 20).reshape(2, 10)).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (base_logits - want).abs().max().item() > 1e-2 * scale      # training moved it
