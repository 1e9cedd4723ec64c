"""merge_and_unload: W' = z**k[:, None] W (Conv1D/Embedding: columns), b' = z**k b, over every case."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCH, ARCHS, CASES, CONFIGS, base_model, is_tied, random_z, rel_err, set_z, token_ids
from propulsion_ds import PropulsionConfig, inject, merge_and_unload
from propulsion_ds.method.propulsion import DELTA_NAME, get_state


def _adapted(arch, config, seed=0):
    base = base_model(arch)
    model = copy.deepcopy(base)
    names = inject(model, config)
    zs = random_z(base, names, config.num_vectors, seed=seed)
    set_z(model, zs)
    return base, model, names, zs


def _needs_untie(model, config) -> bool:
    return is_tied(model) and (config.embeddings or config.lm_head)


def _module_input(module, g):
    if isinstance(module, torch.nn.Embedding):
        return torch.randint(0, module.num_embeddings, (3, 5), generator=g)
    width = module.in_features if isinstance(module, torch.nn.Linear) else module.weight.shape[0]  # Conv1D: (in, out)
    return torch.randn(3, 5, width, generator=g)


@pytest.mark.parametrize("arch,cfg", CASES)
def test_merge_equals_adapter(arch, cfg):
    config = cfg.make(arch)
    base, model, names, zs = _adapted(arch, config)
    ids = token_ids(base)
    with torch.no_grad():
        adapter_logits = model(ids).logits
    untie = _needs_untie(model, config)
    if untie:   # a tied, scaled embedding/lm_head is refused without untie, and nothing changes
        with pytest.raises(ValueError, match="untie"):
            merge_and_unload(model)
        assert get_state(model) is not None and is_tied(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, adapter_logits)

    merged = merge_and_unload(model, untie=untie)
    assert merged is model
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert rel_err(merged_logits, adapter_logits) < 1e-5

    # A plain model again: base keys, no delta, no hooks, no state, nothing trainable.
    assert list(merged.state_dict().keys()) == list(base.state_dict().keys())
    assert not hasattr(merged, DELTA_NAME) and get_state(merged) is None
    assert all(not m._forward_hooks for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    if untie:
        assert not is_tied(merged) and merged.config.tie_word_embeddings is False
        # transformers' cached tie map must not re-tie lm_head to the scaled embedding.
        merged.tie_weights(recompute_mapping=False)
        merged.tie_weights()
        assert not is_tied(merged)
        with torch.no_grad():
            assert torch.equal(merged(ids).logits, merged_logits)

    # Each target, on its own, computes base(x) * mean_i z_i**k (whatever its weight layout);
    # every other parameter is untouched.
    g = torch.Generator().manual_seed(3)
    bmods, mmods = dict(base.named_modules()), dict(merged.named_modules())
    for n in names:
        x = _module_input(bmods[n], g)
        with torch.no_grad():
            want = bmods[n](x).double() * (zs[n] ** config.degree).mean(0)
            got = mmods[n](x)
        assert rel_err(got, want) < 1e-5, n
    prefixes = tuple(n + "." for n in names)
    bsd = base.state_dict()
    for k, v in merged.state_dict().items():
        if not k.startswith(prefixes) and not (untie and k == "lm_head.weight"):
            assert torch.equal(v, bsd[k]), k


def test_gpt2_conv1d_merge_formula():
    arch = ARCH["gpt2"]
    config = PropulsionConfig(targets=["c_attn"], degree=15)
    base, model, names, zs = _adapted(arch, config)
    merged = merge_and_unload(model)
    for n in names:
        s = (zs[n][0] ** 15).float()
        w0, b0 = base.get_submodule(n).weight, base.get_submodule(n).bias
        w1, b1 = merged.get_submodule(n).weight, merged.get_submodule(n).bias
        assert w0.shape == (32, 96)                 # Conv1D stores (in, out): scale columns
        assert torch.allclose(w1, w0 * s[None, :], rtol=1e-6, atol=0)
        assert torch.allclose(b1, b0 * s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("which", ["embeddings", "lm_head"])
@pytest.mark.parametrize("arch_name", ["gpt2", "llama-tied"])
def test_tied_embedding_refuses_without_untie(arch_name, which):
    config = PropulsionConfig(**{which: True})
    base, model, names, zs = _adapted(ARCH[arch_name], config)
    assert is_tied(model)
    with pytest.raises(ValueError) as info:
        merge_and_unload(model)
    msg = str(info.value)
    assert "share one weight" in msg and "untie=True" in msg
    ids = token_ids(base)
    with torch.no_grad():
        adapter_logits = model(ids).logits
        merged = merge_and_unload(model, untie=True)
        assert rel_err(merged(ids).logits, adapter_logits) < 1e-5
    # The unscaled side keeps the base weight.
    if which == "embeddings":
        assert torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
    else:
        assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_tied_model_without_embedding_targets_merges_and_stays_tied():
    base, model, names, zs = _adapted(ARCH["gpt2"], PropulsionConfig())
    merged = merge_and_unload(model)     # no untie needed: neither embedding side is scaled
    assert is_tied(merged) and merged.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.name in ("emb+head", "bias")],
                         ids=lambda c: c.name)
def test_merged_save_pretrained_reloads_with_plain_transformers(arch, cfg, tmp_path):
    config = cfg.make(arch)
    base, model, names, zs = _adapted(arch, config)
    ids = token_ids(base)
    merged = merge_and_unload(model, untie=_needs_untie(model, config))
    with torch.no_grad():
        want = merged(ids).logits
    merged.save_pretrained(tmp_path)
    assert not any(p.name.endswith((".bin", ".pt", ".pth")) for p in tmp_path.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(base)
    assert not hasattr(reloaded, DELTA_NAME)
    assert is_tied(reloaded) == is_tied(merged)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)


def test_merge_in_float64_stays_float64_exact():
    arch = ARCH["qwen2"]
    config = PropulsionConfig(embeddings=True, lm_head=True, num_vectors=2)
    base = base_model(arch).double()
    model = copy.deepcopy(base)
    names = inject(model, config)
    set_z(model, random_z(base, names, 2))
    ids = token_ids(base)
    with torch.no_grad():
        adapter_logits = model(ids).logits
        merged_logits = merge_and_unload(model)(ids).logits
    assert merged_logits.dtype == torch.float64
    assert rel_err(merged_logits, adapter_logits) < 1e-12
