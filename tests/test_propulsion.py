"""Injection, forward and gradient of Propulsion: every (architecture, config) case × one set of checks."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import (ARCH, CASES, base_model, loss_of, n_layers, out_width, random_z,
                      reference_model, rel_err, set_z, token_ids)
from propulsion_ds import PropulsionConfig, inject
from propulsion_ds.method.propulsion import DELTA_NAME, channel_scales, get_state, trainable_parameters
from propulsion_ds.method.multi import initial_delta
from propulsion_ds.method.scale import scale_from_delta


# ---------------------------------------------------------------- generic checks over CASES

@pytest.mark.parametrize("arch,cfg", CASES)
def test_targets_order_and_trainable_count(arch, cfg):
    model = base_model(arch)
    config = cfg.make(arch)
    expected = cfg.expect(arch, n_layers(model))
    names = inject(model, config)
    assert names == expected                      # exactly these, in model order
    modules = dict(model.named_modules())
    widths = sum(out_width(modules[n]) for n in names)

    delta = getattr(model, DELTA_NAME)
    assert delta.shape == (config.num_vectors, widths)
    assert delta.dtype == torch.float32
    if config.num_vectors == 1:
        assert not delta.any()
    else:   # multi-propulsion: distinct vectors whose mean of powers is 1 (tests/test_multi_propulsion.py)
        assert torch.equal(delta, initial_delta(config.num_vectors, widths, config.degree))
    assert get_state(model).trainable_count == config.num_vectors * widths

    biases = [modules[n].bias for n in names if getattr(modules[n], "bias", None) is not None]
    trainable = trainable_parameters(model)
    if config.train_bias:
        assert {id(p) for p in trainable} == {id(delta)} | {id(b) for b in biases}
        assert sum(p.numel() for p in trainable) == config.num_vectors * widths + sum(b.numel() for b in biases)
    else:
        assert len(trainable) == 1 and trainable[0] is delta
        assert sum(p.numel() for p in trainable) == config.num_vectors * widths
    assert trainable == [p for p in model.parameters() if p.requires_grad]
    # No wrapper modules: the module tree (and so every base state_dict key) is unchanged.
    assert set(model.state_dict()) == set(base_model(arch).state_dict()) | {DELTA_NAME}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch,cfg", CASES)
def test_init_is_bit_identical(arch, cfg, dtype):
    base = base_model(arch, dtype)
    model = copy.deepcopy(base)
    inject(model, cfg.make(arch))
    assert getattr(model, DELTA_NAME).dtype == dtype
    ids = token_ids(base)
    with torch.no_grad():
        # n > 1 too: the distinct starting vectors are chosen so the hook's mean is exactly 1 here
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("arch,cfg", CASES)
def test_forward_and_grad_match_float64_reference(arch, cfg):
    base = base_model(arch)
    config = cfg.make(arch)
    model = copy.deepcopy(base)
    names = inject(model, config)
    zs = random_z(base, names, config.num_vectors)
    set_z(model, zs)
    ids = token_ids(base)

    ref, leaves = reference_model(base, zs, config.degree)
    if config.train_bias:
        ref_modules = dict(ref.named_modules())
        for n in names:
            if getattr(ref_modules[n], "bias", None) is not None:
                ref_modules[n].bias.requires_grad_(True)
    ref_logits = ref(ids).logits
    loss_of(ref_logits, ids).backward()
    ref_grad = torch.cat([leaves[n].grad for n in names], dim=1)

    logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref_logits) < 1e-5
    assert rel_err(logits, base(ids).logits) > 1e-3          # z really changed the output
    loss_of(logits, ids).backward()
    grad = getattr(model, DELTA_NAME).grad                  # d/d delta == d/d z  (z = 1 + delta)
    assert grad.shape == ref_grad.shape
    assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 1e-4

    if config.train_bias:
        mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
        pairs = [(mods[n].bias.grad, ref_mods[n].bias.grad) for n in names
                 if getattr(mods[n], "bias", None) is not None]
        for g, rg in pairs:
            assert g is not None and (g.double() - rg).norm() <= 1e-4 * rg.norm() + 1e-12
        frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
        assert all(p.grad is None for p in frozen)

    # The same model in float64 matches to float64 precision (scale is not rounded through fp32).
    model64 = copy.deepcopy(base).double()
    inject(model64, config)
    set_z(model64, zs)
    assert getattr(model64, DELTA_NAME).dtype == torch.float64
    logits64 = model64(ids).logits
    assert rel_err(logits64, ref_logits) < 1e-12
    loss_of(logits64, ids).backward()
    assert (getattr(model64, DELTA_NAME).grad - ref_grad).norm() / ref_grad.norm() < 1e-10


# ---------------------------------------------------------------- specific checks

def _llama_meta(hidden, intermediate, layers, heads):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("size,shape,count", [
    ("7B", (4096, 11008, 32, 32), 1_359_872),
    ("13B", (5120, 13824, 40, 40), 2_129_920),
])
def test_paper_trainable_counts_on_meta(size, shape, count):
    model = _llama_meta(*shape)
    names = inject(model, PropulsionConfig())
    delta = getattr(model, DELTA_NAME)
    assert delta.is_meta and delta.shape == (1, count)
    assert len(names) == 7 * shape[2]
    assert sum(p.numel() for p in trainable_parameters(model)) == count
    assert get_state(model).trainable_count == count


def test_bf16_model_resolves_small_z_change_bf16_z_cannot():
    arch = ARCH["llama"]
    base = base_model(arch, torch.bfloat16)
    model = copy.deepcopy(base)
    inject(model)
    ids = token_ids(base)
    # A bf16 z cannot hold 1.001: it rounds to 1.0, so z**k would not move at all.
    z_bf16 = torch.tensor(1.001, dtype=torch.bfloat16)
    assert z_bf16.item() == 1.0 and (z_bf16.float() ** 15).item() == 1.0
    # The offset delta = 1e-3 is held in bf16 (to 3 significant digits) and moves the output.
    with torch.no_grad():
        getattr(model, DELTA_NAME).fill_(1e-3)
    assert getattr(model, DELTA_NAME).dtype == torch.bfloat16
    scale = scale_from_delta(getattr(model, DELTA_NAME), 15)
    assert scale.dtype == torch.float32
    assert abs(scale[0].item() - 1.001 ** 15) < 1e-4
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base(ids).logits)


def test_inject_twice_raises():
    model = base_model(ARCH["llama"])
    inject(model)
    with pytest.raises(ValueError, match="already injected"):
        inject(model)


@pytest.mark.parametrize("targets", [["q_proj", "no_such_proj"], [r"model\.layers\.9\..*"]])
def test_pattern_matching_nothing_names_it(targets):
    model = base_model(ARCH["llama"])
    with pytest.raises(ValueError) as info:
        inject(model, PropulsionConfig(targets=targets))
    assert repr(targets[-1]) in str(info.value)
    assert get_state(model) is None and not hasattr(model, DELTA_NAME)
    assert all(p.requires_grad for p in model.parameters())   # nothing was frozen either


@pytest.mark.parametrize("kwargs", [
    dict(degree=0), dict(degree=1.5), dict(degree=True), dict(num_vectors=0),
    dict(targets="everything"), dict(targets=[]), dict(targets=[""]), dict(embeddings="yes"),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PropulsionConfig(**kwargs)


def test_multi_vector_scale_is_mean_of_powers():
    delta = torch.tensor([[0.01, -0.02], [0.03, 0.0], [-0.01, 0.02]], dtype=torch.float64)
    expect = ((1 + delta) ** 5).mean(0)
    assert torch.allclose(scale_from_delta(delta, 5), expect, rtol=0, atol=1e-15)
    assert torch.equal(scale_from_delta(torch.zeros(1, 3), 15), torch.ones(3))


def test_channel_scales_per_target():
    arch = ARCH["qwen2"]
    model = base_model(arch)
    config = PropulsionConfig(num_vectors=2, degree=9)
    names = inject(model, config)
    zs = random_z(model, names, 2)
    set_z(model, zs)
    scales = channel_scales(model)
    assert list(scales) == names
    for n in names:
        assert scales[n].dtype == torch.float32
        assert torch.allclose(scales[n].double(), (zs[n] ** 9).mean(0), rtol=1e-6, atol=0)


def test_deepcopy_of_injected_model_reads_its_own_delta():
    arch = ARCH["llama"]
    base = base_model(arch)
    model = copy.deepcopy(base)
    inject(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        getattr(clone, DELTA_NAME).fill_(0.01)
    ids = token_ids(base)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)        # original untouched
        assert not torch.equal(clone(ids).logits, base(ids).logits)    # the copy uses its own delta
