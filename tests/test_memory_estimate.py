"""The planner's model of ZeRO-3's gathered parameters and of masked attention, and
bench/memory_check.py's estimate for the measured SmolLM2 runs (arithmetic, not wall time)."""
import json
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from propulsion_ds.tools.memory import (Cluster, ZeroSettings, activation_bytes, layout_zero,  # noqa: E402
                                        logits_bytes, mask_bytes_per_token, method_plan, model_shape,
                                        zero3_live_params)
from test_memory import ROOT, SMOLLM2_SHAPE, saved_bytes  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M's shape (config only, meta device): 30 layers, tied 49152 x 576 embedding."""
    from transformers import LlamaConfig
    d = tmp_path_factory.mktemp("smollm2")
    LlamaConfig(**SMOLLM2_SHAPE, num_hidden_layers=30, head_dim=64).save_pretrained(d)
    return model_shape(d / "config.json")


def test_zero3_keeps_the_whole_model_gathered_when_reuse_covers_it(smollm2):
    """Reuse distance 1e9 > 2P: every parameter of the forward is reused in the backward within it,
    so all P stay gathered; prefetch and persistent parameters are part of P, not added to it."""
    s = smollm2
    assert s.total_params == 134_515_008 and s.largest_module_params == 49152 * 576
    z = layout_zero("zero3", Cluster(1, 2), s.hidden_size)
    assert zero3_live_params(s, z) == s.total_params
    plan = method_plan("propulsion", s, z, Cluster(1, 2), seq=128, batch=2, checkpointing=False, dtype_bytes=4)
    assert plan.buffers == 4 * (z.reduce_bucket_size + s.total_params - s.largest_module_params)
    # partition + largest module row + the rest gathered: the whole model once, plus its half
    gathered = plan.buffers - 4 * z.reduce_bucket_size + 4 * s.largest_module_params
    assert gathered == 4 * s.total_params


def test_zero3_short_reuse_distance_keeps_only_the_tail(smollm2):
    s = smollm2
    z = ZeroSettings(stage=3, max_reuse_distance=20_000_000, prefetch_bucket_size=1_000_000,
                     persistence_threshold=5760)
    running = max(s.largest_module_params, s.decoder_layer_params)
    want = 10_000_000 + running + 1_000_000 + s.persistent_params(5760)
    assert zero3_live_params(s, z) == want < s.total_params
    # stage3_max_live_parameters caps the prefetcher only: retention does not depend on it
    assert zero3_live_params(s, ZeroSettings(stage=3, max_reuse_distance=20_000_000, prefetch_bucket_size=1_000_000,
                                             persistence_threshold=5760, max_live_parameters=1)) == want


def test_masked_attention_term():
    per = mask_bytes_per_token(128, 576, 192, 4)
    assert per == 4 * (2 * (576 - 192) + 192 + 128)
    assert mask_bytes_per_token(128, 576, 192, 2) == 2 * (2 * (576 - 192) + 192 + 128)
    assert mask_bytes_per_token(128, 576, 192, 2, "lora") == 2 * (2 * (576 - 192) + 128)
    kw = dict(seq=128, batch=2, hidden=576, heads=9, layers=30, checkpointing=False, dtype_bytes=4, kv_dim=192,
              intermediate=1536)
    assert activation_bytes(masked=True, **kw) - activation_bytes(**kw) == 128 * 2 * 30 * per
    ck = dict(kw, checkpointing=True)
    assert activation_bytes(masked=True, **ck) - activation_bytes(**ck) == 128 * 2 * per   # one layer recomputed


@pytest.mark.parametrize("method", ["propulsion", "lora"])
@pytest.mark.parametrize("dtype_bytes", [4, 2])
def test_masked_attention_term_matches_saved_tensors(dtype_bytes, method):
    """Packed rows (two documents per row, as position_ids): what one SmolLM2-shaped layer saves
    beyond the unmasked table, counted with saved_tensors_hooks."""
    import copy
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from propulsion_ds import inject
    from propulsion_ds.method.propulsion import PropulsionConfig
    seq, batch = 64, 2
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(24), torch.arange(seq - 24)]).expand(batch, seq)
    counts = {}
    for layers in (1, 2):
        c = copy.deepcopy(LlamaConfig(**SMOLLM2_SHAPE))
        c.num_hidden_layers, c.use_cache, c._attn_implementation = layers, False, "sdpa"
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(c).requires_grad_(False)
        if method == "propulsion":
            inject(m, PropulsionConfig())
        else:
            from peft import get_peft_model
            from bench import common
            m = get_peft_model(m, common.lora_config(8))
        m.to(dtype)
        counts[layers] = (saved_bytes(m, input_ids=ids, labels=ids),
                          saved_bytes(m, input_ids=ids, labels=ids, position_ids=pos))
    plain = counts[2][0] - counts[1][0]
    masked = counts[2][1] - counts[1][1]
    want = seq * batch * mask_bytes_per_token(seq, 576, 192, dtype_bytes, method)
    assert masked - plain == pytest.approx(want, rel=0.03), (masked - plain, want)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_memory_check_estimate_uses_the_trainers_resolved_config(smollm2, stage, tmp_path):
    """bench/memory_check.py resolves the shipped config with the model's hidden size, as the
    trainer does, and its estimate is the sum of the planner's parts for it (packed: masked)."""
    from bench import memory_check
    from propulsion_ds.config.deepspeed import resolve_deepspeed
    s = smollm2
    cfg = memory_check.run_config(stage, str(ROOT / "assets/stories260K"), str(tmp_path / "out"),
                                  str(tmp_path / "cache"), 4)
    ds = resolve_deepspeed(cfg, 2, s.hidden_size)
    zero = ZeroSettings.from_deepspeed(ds)
    assert zero.stage == stage
    if stage:
        assert zero.reduce_bucket_size == 576 * 576          # "auto" from the model's width
    if stage == 3:
        assert zero.prefetch_bucket_size == int(0.9 * 576 * 576) and zero.persistence_threshold == 5760
    plan = memory_check.estimate(s, ds, 2, "propulsion", 128, 2, 4)
    T = s.propulsion_trainable
    act = activation_bytes(128, 2, 576, 9, 30, False, 4, kv_dim=192, intermediate=1536, masked=True)
    assert plan.activations == act and plan.logits == logits_bytes(128, 2, 49152, 4)
    p_div, g_div, o_div = (2 if stage >= 3 else 1), (2 if stage >= 2 else 1), (2 if stage >= 1 else 1)
    states = (4 * (s.total_params + T) / p_div + 4 * T / g_div + 8 * T / o_div     # params, grads, Adam m+v
              + (4 * s.largest_module_params if stage == 3 else 0))
    assert plan.model_states_gpu == pytest.approx(states, abs=8)
    # on CPU only the written part of a reduce bucket is resident: at most the trained elements
    bucket = min(576 * 576, T)
    buffers = {0: 0, 2: 4 * bucket * 2, 3: 4 * (bucket + s.total_params - s.largest_module_params)}[stage]
    assert plan.buffers == buffers
    assert plan.total_gpu == plan.model_states_gpu + act + plan.logits + buffers


@pytest.mark.slow
@pytest.mark.smollm2
def test_memory_check_zero3_within_10_percent_on_smollm2(tmp_path):
    """The real SmolLM2-135M, 2 CPU ranks, ZeRO-3 as the trainer configures it: the measured
    training-steps peak over the baseline within 10% of the planner (about 1-3 minutes)."""
    from bench import memory_check
    assert memory_check.main(["--layouts", "3", "--steps", "3", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory_check_smollm2.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["stage"] == 3
    assert rows[0]["within"], rows[0]
