"""One scale formula: the hook, ``channel_scales``, the streaming merge's plan and the peft export
all get the very same fp32 values (bit for bit) from one delta, also with several vectors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from propulsion_ds import PropulsionConfig, inject, save_adapter
from propulsion_ds.errors import AdapterError
from propulsion_ds.method.adapter import WEIGHTS_FILE, adapter_delta, read_adapter_weights
from propulsion_ds.method.propulsion import DELTA_NAME, channel_scales, get_state
from propulsion_ds.tools.export_peft import ia3_vectors
from propulsion_ds.tools.merge import merge
from propulsion_ds.tools.merge_plan import checkpoint_files, plan_merge, read_header



@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA with widths (40, 20, 100) that put the targets' slices at unaligned offsets
    of the delta, where one reduction over the whole delta rounds some means differently."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=40, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("scales") / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _model(base_dir, n: int, seed: int = 0):
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    inject(model, PropulsionConfig(degree=15, num_vectors=n))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = getattr(model, DELTA_NAME)
        d.add_(torch.randn(d.shape, generator=g) * 0.01)
    return model


@pytest.mark.parametrize("n", [1, 3, 4])
def test_channel_scales_are_what_the_hook_multiplies_by(n, base_dir):
    model = _model(base_dir, n)
    scales = channel_scales(model)
    modules = dict(model.named_modules())
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for name in scales:
        m = modules[name]
        if m.in_features != x.shape[-1]:
            continue
        for grad in (False, True):                    # the no-grad path and _Propel
            with torch.set_grad_enabled(grad):
                hooked = m(x)
                plain = m.forward(x)                  # forward() skips the hook
            assert torch.equal(hooked.detach(), plain.detach() * scales[name]), (name, grad)


@pytest.mark.parametrize("n", [1, 4])
def test_merge_plan_and_peft_use_the_models_own_scales(n, tmp_path, base_dir):
    model = _model(base_dir, n, seed=2)
    save_adapter(model, tmp_path / "adapter")
    want = channel_scales(model)
    weights = read_adapter_weights(tmp_path / "adapter")
    # z - 1 need not be the trained delta bit for bit, but 1 + (z - 1) is z = 1 + delta exactly
    assert torch.equal(1.0 + adapter_delta(model, weights), 1.0 + getattr(model, DELTA_NAME).detach())
    shards, _ = checkpoint_files(base_dir)
    headers = {k: v for s in shards for k, v in read_header(s).items()}
    plan = plan_merge(base_dir, tmp_path / "adapter", headers, untie=False)
    assert set(plan.scales) == {f"{name}.weight" for name in want}
    for name, s in want.items():
        assert torch.equal(plan.scales[f"{name}.weight"].scale, s), name
    ia3 = ia3_vectors(model, weights)
    assert list(ia3) == list(want)
    assert all(torch.equal(ia3[k].flatten(), want[k]) for k in want)


def test_merge_refuses_bias_keys_the_adapter_does_not_train(tmp_path, base_dir):
    """train_bias=false: a ``.bias`` key in the file is unexpected, as ``load_adapter`` says too."""
    model = _model(base_dir, 1)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_FILE
    sd = load_file(str(path))
    name = get_state(model).slots[0].name
    sd[name + ".bias"] = torch.zeros(get_state(model).slots[0].size)
    save_file(sd, str(path))
    with pytest.raises(AdapterError, match="unexpected key"):
        merge(base_dir, tmp_path / "adapter", tmp_path / "merged", verify=False)
    assert not (tmp_path / "merged").exists()
