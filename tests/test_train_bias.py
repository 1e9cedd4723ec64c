"""train_bias: the adapter holds the trained biases, and every way back to a model applies them.

Biases and z are trained for real (Adam steps, so both moved), then: save_adapter -> load_adapter
into a fresh base, merge_and_unload, the streaming merge (propulsion_ds.tools.merge) reloaded with plain
transformers; each must give the trained model's logits. The same adapter without its biases is
shown to differ, so the checks see the biases.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import ARCH, base_model, loss_of, token_ids
from propulsion_ds import AdapterError, PropulsionConfig, inject, load_adapter, merge_and_unload, save_adapter
from propulsion_ds.method.adapter import WEIGHTS_FILE, read_adapter_weights, trained_bias_params
from propulsion_ds.tools.merge import merge


def _trained(arch, steps=8):
    base = base_model(arch)
    model = copy.deepcopy(base)
    inject(model, PropulsionConfig(degree=15, train_bias=True))
    before = {n: b.detach().clone() for n, b in trained_bias_params(model)}
    assert before, f"{arch.name} has no biased targets"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        ids = token_ids(base, batch=4, length=12, seed=step)
        loss_of(model(ids).logits, ids).backward()
        opt.step()
        opt.zero_grad()
    moved = max((b.detach() - before[n]).abs().max().item() for n, b in trained_bias_params(model))
    assert moved > 1e-2                                   # the biases really trained
    return base, model.eval()


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch_name", ["qwen2", "gpt2"])
def test_trained_biases_round_trip_and_merge(arch_name, tmp_path):
    arch = ARCH[arch_name]
    base, model = _trained(arch)
    ids = token_ids(base, batch=2, length=9, seed=99)
    with torch.no_grad():
        want = model(ids).logits
    base.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    weights = read_adapter_weights(tmp_path / "adapter")
    names = [n for n, _ in trained_bias_params(model)]
    assert {n + ".bias" for n in names} <= set(weights)
    assert all(weights[n + ".bias"].dtype == torch.float32 for n in names)

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = fresh(ids).logits
    assert _max_diff(got, want) <= 1e-6 * want.abs().max().item()

    # Without the biases (what the adapter held before): clearly different logits.
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "propulsion_config.json").write_text((tmp_path / "adapter" / "propulsion_config.json").read_text())
    save_file({k: v for k, v in weights.items() if not k.endswith(".bias")}, str(stripped / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="holds no biases"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), stripped)
    no_bias = copy.deepcopy(base)
    inject(no_bias, PropulsionConfig(degree=15, train_bias=True))
    with torch.no_grad():
        no_bias.propulsion_delta.copy_(model.propulsion_delta)
        assert _max_diff(no_bias(ids).logits, want) > 1e-2

    # merge_and_unload of the reloaded model
    merged = merge_and_unload(fresh)
    with torch.no_grad():
        assert _max_diff(merged(ids).logits, want) <= 1e-5 * want.abs().max().item()

    # the streaming merge, reloaded with plain transformers
    res = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", verify=True)
    assert res.trained_biases == len(names) and res.max_rel_err < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _max_diff(plain(ids).logits, want) <= 1e-5 * want.abs().max().item()
    sd = load_file(str(tmp_path / "merged" / "model.safetensors"))
    scales = {n: (weights[n + ".propulsion"].double() ** 15) for n in names}
    for n in names:        # merged bias = z**k * trained bias (checkpoint key may lack a prefix)
        key = next(k for k in sd if n.endswith(k[:-len(".bias")]) and k.endswith(".bias")
                   and (n + ".bias").endswith(k))
        torch.testing.assert_close(sd[key].double(), scales[n] * weights[n + ".bias"].double())

    # the streaming merge refuses an old adapter whose train_bias biases are missing
    with pytest.raises(AdapterError, match="no trained bias"):
        merge(tmp_path / "base", stripped, tmp_path / "merged2", verify=False)
