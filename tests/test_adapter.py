"""Adapter files (propulsion.safetensors + propulsion_config.json): round trip over every case,
and a clear AdapterError for every bad file; nothing is ever unpickled."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import ARCH, CASES, LLAMA_TINY, base_model, random_z, set_z, token_ids
from propulsion_ds import (AdapterError, PropulsionConfig, adapter_state_dict, inject, load_adapter,
                           load_adapter_state_dict, save_adapter)
from propulsion_ds.method.adapter import (CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_adapter_config,
                                          read_adapter_weights)
from propulsion_ds.method.compat import check_compatible
from propulsion_ds.method.propulsion import DELTA_NAME, get_state


def _adapted(arch, config, dtype=torch.float32, seed=0):
    base = base_model(arch, dtype)
    model = copy.deepcopy(base)
    names = inject(model, config)
    zs = random_z(base, names, config.num_vectors, seed=seed)
    set_z(model, zs)
    return base, model, names, zs


# ---------------------------------------------------------------- round trip over CASES

@pytest.mark.parametrize("arch,cfg", CASES)
def test_save_load_round_trip(arch, cfg, tmp_path):
    config = cfg.make(arch)
    base, model, names, zs = _adapted(arch, config)
    ids = token_ids(base)

    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    count = get_state(model).trainable_count
    modules = dict(model.named_modules())
    biased = [n for n in names if config.train_bias and getattr(modules[n], "bias", None) is not None]
    bias_count = sum(modules[n].bias.numel() for n in biased)
    header_budget = 1024 + 128 * (len(names) + len(biased))
    # fp32 z (and the trained biases with train_bias), nothing else
    assert (out / WEIGHTS_FILE).stat().st_size <= 4 * (count + bias_count) + header_budget

    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["propulsion"] == config.to_dict()
    assert meta["architecture"] == type(model).__name__
    assert meta["trainable_count"] == count
    assert list(meta["targets"]) == names

    weights = load_file(str(out / WEIGHTS_FILE))
    assert set(weights) == {n + ".propulsion" for n in names} | {n + ".bias" for n in biased}
    for n in biased:
        assert weights[n + ".bias"].dtype == torch.float32
        assert torch.equal(weights[n + ".bias"], modules[n].bias.detach().float())
    assert meta["biases"] == {n: modules[n].bias.numel() for n in biased}
    for n in names:   # files hold z itself (paper's definition), fp32
        z = weights[n + ".propulsion"]
        assert z.dtype == torch.float32
        want = zs[n][0] if config.num_vectors == 1 else zs[n]
        assert z.shape == want.shape
        assert torch.allclose(z.double(), want, rtol=0, atol=1e-7)

    fresh = base_model(arch)
    assert load_adapter(fresh, out) is fresh
    assert get_state(fresh).config == config
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    again = adapter_state_dict(fresh)
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    # Loading into the already-injected model is allowed too (same config).
    load_adapter(model, out)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_round_trip_bf16_keeps_delta_exactly(tmp_path):
    arch = ARCH["llama"]
    base, model, names, zs = _adapted(arch, PropulsionConfig(), dtype=torch.bfloat16)
    save_adapter(model, tmp_path)
    fresh = base_model(arch, torch.bfloat16)
    load_adapter(fresh, tmp_path)
    assert torch.equal(getattr(fresh, DELTA_NAME), getattr(model, DELTA_NAME))


def test_save_with_external_fp32_master_delta(tmp_path):
    # DeepSpeed keeps an fp32 master copy; save_adapter(delta=...) writes that instead.
    arch = ARCH["llama"]
    base, model, names, zs = _adapted(arch, PropulsionConfig(), dtype=torch.bfloat16)
    master = torch.cat([z - 1 for z in zs.values()], dim=1).float()
    save_adapter(model, tmp_path, delta=master)
    w = read_adapter_weights(tmp_path)
    for n in names:
        assert torch.allclose(w[n + ".propulsion"].double(), zs[n][0], rtol=0, atol=1e-7)


# ---------------------------------------------------------------- bad adapters

ARCH_LLAMA = ARCH["llama"]


@pytest.fixture
def saved(tmp_path):
    base, model, names, zs = _adapted(ARCH_LLAMA, PropulsionConfig())
    save_adapter(model, tmp_path / "ok")
    return tmp_path / "ok", names


def _rewrite_weights(directory, edit):
    sd = load_file(str(directory / WEIGHTS_FILE))
    edit(sd)
    save_file(sd, str(directory / WEIGHTS_FILE))


def _rewrite_config(directory, edit):
    meta = json.loads((directory / CONFIG_FILE).read_text())
    edit(meta)
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def _load_fails(directory, model=None, match=None):
    model = base_model(ARCH_LLAMA) if model is None else model
    with pytest.raises(AdapterError) as info:
        load_adapter(model, directory)
    if match is not None:
        for m in ([match] if isinstance(match, str) else match):
            assert m in str(info.value), (m, str(info.value))
    return str(info.value), model


def test_missing_key(saved):
    directory, names = saved
    _rewrite_weights(directory, lambda sd: sd.pop(names[3] + ".propulsion"))
    _load_fails(directory, match=["missing", repr(names[3] + ".propulsion")])


def test_unexpected_key(saved):
    directory, names = saved
    _rewrite_weights(directory, lambda sd: sd.__setitem__("model.layers.7.mlp.extra.propulsion", torch.ones(4)))
    _load_fails(directory, match=["unexpected", "model.layers.7.mlp.extra.propulsion"])


def test_wrong_shape_names_the_key(saved):
    directory, names = saved
    key = names[4] + ".propulsion"
    _rewrite_weights(directory, lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    _load_fails(directory, match=[repr(key), "shape"])


def test_load_state_dict_directly_is_strict():
    base, model, names, zs = _adapted(ARCH_LLAMA, PropulsionConfig())
    sd = adapter_state_dict(model)
    before = getattr(model, DELTA_NAME).detach().clone()
    with pytest.raises(AdapterError, match="missing"):
        load_adapter_state_dict(model, {k: v for k, v in sd.items() if k != names[0] + ".propulsion"})
    with pytest.raises(AdapterError, match="unexpected"):
        load_adapter_state_dict(model, {**sd, "x.propulsion": torch.ones(2)})
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_state_dict(model, {**sd, names[0] + ".propulsion": torch.ones(2, 32)})
    assert torch.equal(getattr(model, DELTA_NAME), before)    # a refused load writes nothing
    load_adapter_state_dict(model, sd)
    # Files hold z = 1 + delta in fp32, so delta comes back as fl(1 + delta) - 1: the z (and so
    # every scale, which the hooks compute from fl(1 + delta)) is bit-identical.
    assert torch.equal(1.0 + getattr(model, DELTA_NAME), 1.0 + before)


def test_adapter_for_another_architecture(saved):
    directory, _ = saved
    msg, _ = _load_fails(directory, model=base_model(ARCH["mistral"]),
                         match=["LlamaForCausalLM", "MistralForCausalLM"])
    _load_fails(directory, model=base_model(ARCH["gpt2"]), match=["LlamaForCausalLM", "GPT2LMHeadModel"])


def test_adapter_for_another_size_names_the_module(saved):
    directory, _ = saved
    torch.manual_seed(0)
    wider = AutoModelForCausalLM.from_config(LlamaConfig(**dict(LLAMA_TINY, intermediate_size=64)))
    _load_fails(directory, model=wider, match=["model.layers.0.mlp.gate_proj", "48", "64"])
    torch.manual_seed(0)
    shallower = AutoModelForCausalLM.from_config(LlamaConfig(**dict(LLAMA_TINY, num_hidden_layers=1)))
    _load_fails(directory, model=shallower, match=["model.layers.1.self_attn.q_proj", "does not have"])


def test_adapter_for_other_targets(saved):
    directory, _ = saved
    model = base_model(ARCH_LLAMA)
    inject(model, PropulsionConfig(targets="attention"))
    _load_fails(directory, model=model, match=["already carries"])


def test_truncated_safetensors(saved):
    directory, _ = saved
    path = directory / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg, model = _load_fails(directory, match=[WEIGHTS_FILE, "truncated or corrupted"])
    assert get_state(model) is None   # a file that cannot be read leaves the model as it was


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"garbage bytes, not safetensors" * 10,
                                     b"\xff" * 8 + b"{}"], ids=["empty", "short", "text", "bad-header"])
def test_garbage_weights(saved, payload):
    directory, _ = saved
    (directory / WEIGHTS_FILE).write_bytes(payload)
    _load_fails(directory, match=[WEIGHTS_FILE])


def test_missing_files(saved, tmp_path):
    directory, _ = saved
    _load_fails(tmp_path / "does-not-exist", match=[CONFIG_FILE, "not found"])
    (directory / WEIGHTS_FILE).unlink()
    msg, model = _load_fails(directory, match=[WEIGHTS_FILE, "not found"])
    assert get_state(model) is None
    (directory / CONFIG_FILE).unlink()
    _load_fails(directory, match=[CONFIG_FILE, "not a propulsion adapter directory"])


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(saved, version):
    directory, _ = saved
    _rewrite_config(directory, lambda m: m.__setitem__("format_version", version))
    _load_fails(directory, match=["format_version", repr(version)])


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format_version": 1}',
                                  '{"format_version": 1, "propulsion": {}, "targets": ["a"]}'],
                         ids=["invalid", "list", "no-sections", "targets-not-a-dict"])
def test_bad_config_json(saved, text):
    directory, _ = saved
    (directory / CONFIG_FILE).write_text(text)
    _load_fails(directory, match=[CONFIG_FILE])


def test_bad_propulsion_section(saved):
    directory, _ = saved
    _rewrite_config(directory, lambda m: m["propulsion"].__setitem__("degree", 0))
    _load_fails(directory, match=["bad 'propulsion' section", "degree"])
    _rewrite_config(directory, lambda m: m["propulsion"].__setitem__("rank", 8))
    _load_fails(directory, match=["bad 'propulsion' section"])


def test_check_compatible_direct(saved):
    directory, names = saved
    meta = read_adapter_config(directory)
    model = base_model(ARCH_LLAMA)
    inject(model, PropulsionConfig())
    check_compatible(model, meta)
    meta["targets"].pop(names[-1])
    with pytest.raises(AdapterError, match="does not contain"):
        check_compatible(model, meta)


class _Boom:
    """Unpickling this would run code; the test proves the loader never unpickles."""
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Boom.ran = True
    return {}


def test_nothing_is_unpickled(saved, monkeypatch):
    directory, names = saved

    def refuse(*a, **k):
        raise AssertionError("the adapter loader must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = base_model(ARCH_LLAMA)
    load_adapter(model, directory)          # works with every unpickler disabled
    assert get_state(model) is not None
    monkeypatch.undo()

    # A pickle (what torch.save writes) in place of the safetensors file is rejected, not run.
    path = directory / WEIGHTS_FILE
    path.write_bytes(pickle.dumps(_Boom()))
    _load_fails(directory, match=[WEIGHTS_FILE])
    torch.save({names[0] + ".propulsion": _Boom()}, path)
    _load_fails(directory, match=[WEIGHTS_FILE])
    assert _Boom.ran is False


def test_adapter_sources_use_only_safetensors_and_json():
    import inspect

    import propulsion_ds.method.adapter as adapter

    src = inspect.getsource(adapter)
    for banned in ("torch.load", "pickle", "weights_only", "np.load"):
        assert banned not in src, banned
