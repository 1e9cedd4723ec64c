"""What each method really keeps for backward, counted with torch.autograd.graph.saved_tensors_hooks
on a SmolLM2-shaped decoder (h=576, d_kv=192, I=1536, GQA 9/3; random weights, sdpa): bytes per
token per layer, as the slope over two batch sizes of a 2-layer minus a 1-layer model, so the
per-channel tensors (Propulsion's s and z) and everything outside the layers cancel.

"base": the frozen model with an input that needs a gradient, i.e. what the layer's own ops keep
to pass a gradient through. Propulsion adds only q', k', o' and down' (3h + d_kv values): it saves
every target's output y', and the next op keeps v' (attention), gate' (SiLU) and up' (the product)
anyway. LoRA adds each target's input (q/k/v share one, gate/up share one, o's is attention's
output, which attention keeps anyway) and the r-wide A outputs: 2h + I + 7r. docs/MEMORY.md.
"""
import copy

import pytest
import torch

from test_memory import ROOT, SMOLLM2_SHAPE, saved_bytes

H, KV, I, R = 576, 192, 1536, 8


def per_token_layer(method: str, dtype, seq: int = 32) -> float:
    from transformers import AutoModelForCausalLM, LlamaConfig
    from propulsion_ds import inject
    from propulsion_ds.method.propulsion import PropulsionConfig
    from bench import common
    counts = {}
    for layers in (1, 2):
        c = copy.deepcopy(LlamaConfig(**SMOLLM2_SHAPE))
        c.num_hidden_layers, c.use_cache, c._attn_implementation = layers, False, "sdpa"
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(c).requires_grad_(False)
        if method == "propulsion":
            inject(m, PropulsionConfig())
        elif method == "lora":
            from peft import get_peft_model
            m = get_peft_model(m, common.lora_config(R))
        m.to(dtype)                  # after the method, as DeepSpeed casts the whole module
        for b in (2, 4):
            x = torch.randn(b, seq, H, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(True)
            counts[layers, b] = saved_bytes(m, inputs_embeds=x)
    return ((counts[2, 4] - counts[1, 4]) - (counts[2, 2] - counts[1, 2])) / (2 * seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_what_propulsion_and_lora_keep_beyond_the_frozen_layer(dtype):
    db = 4 if dtype == torch.float32 else 2
    base = per_token_layer("base", dtype)
    propulsion, lora = per_token_layer("propulsion", dtype), per_token_layer("lora", dtype)
    assert propulsion - base == db * (3 * H + KV), (propulsion, base)
    assert lora - base == db * (2 * H + I + 7 * R), (lora, base)
    assert propulsion < lora


def test_planner_puts_propulsion_below_lora_at_13b_and_70b():
    """The planner's totals (same cluster, same DeepSpeed config), bf16 with checkpointing as the
    shipped 13B/70B configs run: Propulsion below LoRA r=8, as the counts above say per layer."""
    from propulsion_ds.method.propulsion import PropulsionConfig
    from propulsion_ds.tools.memory import Cluster, ZeroSettings, layer_activation_bytes_per_token, method_plan, model_shape
    for model, batch in (("llama2-13b", 4), ("llama2-70b", 2)):
        shape = model_shape(ROOT / "configs/models" / model / "config.json", PropulsionConfig())
        kw = dict(seq=2048, batch=batch, checkpointing=True)
        p, l = (method_plan(m, shape, ZeroSettings(stage=3), Cluster(1, 8), **kw) for m in ("propulsion", "lora"))
        assert p.activations < l.activations and p.total_gpu < l.total_gpu, (model, p.total_gpu, l.total_gpu)
        for db in (4, 2):
            args = (shape.hidden_size, shape.kv_dim or shape.hidden_size, shape.intermediate_size, shape.num_heads, db)
            assert layer_activation_bytes_per_token("propulsion", *args) < layer_activation_bytes_per_token("lora", *args)
