"""train_bias: the adapter holds the trained biases, and every way back to a model applies them.

Biases and z are trained for real (Adam steps, so both moved), then: save_adapter -> load_adapter
into a fresh base, merge_and_unload, the streaming merge (propulsion_ds.tools.merge) reloaded with plain
transformers; each must give the trained model's logits. The same adapter without its biases is
shown to differ, so the checks see the biases.

With weight decay, the trainer's optimizer (``ds_engine.DSEngine``, real DeepSpeed, ZeRO-0 and
ZeRO-2) decays the Propulsion vectors but never the pretrained biases: an update with zero
gradients, where AdamW's only move is the decay, shrinks the delta by (1 - lr * wd) and leaves every
bias bit for bit.
"""
from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import ARCH, base_model, loss_of, token_ids
from helpers import run_train, tail
from propulsion_ds import AdapterError, PropulsionConfig, inject, load_adapter, merge_and_unload, save_adapter
from propulsion_ds.method.adapter import WEIGHTS_FILE, read_adapter_weights
from propulsion_ds.method.gather import trained_bias_params
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


DECAY_SCRIPT = textwrap.dedent('''
    import json, sys, types, torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from propulsion_ds import distributed as dist
    from propulsion_ds import PropulsionConfig, inject
    from propulsion_ds.method.adapter import trained_bias_params
    from propulsion_ds.train.ds_engine import DSEngine
    dist.init_distributed()
    LR, WD, out = 0.1, 0.5, {}
    for stage in (0, 2):
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, use_cache=False)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
        inject(model, PropulsionConfig(degree=15, train_bias=True))
        with torch.no_grad():
            model.propulsion_delta.fill_(0.1)
        before = {n: b.detach().clone() for n, b in trained_bias_params(model)}
        train = types.SimpleNamespace(lr=LR, weight_decay=WD, schedule="constant", warmup_steps=0)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}}
        engine = DSEngine(model, ds, train, max_steps=1)
        ids = torch.randint(0, 128, (2, 12))
        engine.engine.backward(0.0 * engine.engine(input_ids=ids).logits.sum())   # zero gradients
        assert engine.boundary_step(veto=False)
        after = dict(trained_bias_params(model))
        out[stage] = {"biases": len(before),
                      "bias_moved": max(float((after[n] - b).abs().max()) for n, b in before.items()),
                      "delta": model.propulsion_delta.detach().float().flatten().tolist()[:8]}
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_pretrained_biases_are_not_decayed(tmp_path):
    script = tmp_path / "decay.py"
    script.write_text(DECAY_SCRIPT)
    proc = run_train([], nproc=1, script=script)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for stage, r in result.items():
        assert r["biases"] > 0, stage
        assert r["bias_moved"] == 0.0, f"ZeRO-{stage}: weight decay moved a pretrained bias by {r['bias_moved']}"
        assert r["delta"] == pytest.approx([0.1 * (1 - 0.1 * 0.5)] * 8, rel=1e-5), (stage, r["delta"])
