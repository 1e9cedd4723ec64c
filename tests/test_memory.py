"""Memory planner: agreement with DeepSpeed's ZeRO-3 estimator, sanity, and the CLI."""
import contextlib
import copy
import io
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from propulsion_ds.tools.memory import (DEEPSPEED_CONFIGS, REPLICATE_HEADROOM, Cluster,  # noqa: E402
                                  PlanError, ZeroSettings, activation_bytes, deepspeed_reference,
                                  layout_zero, method_plan, model_shape, plan_from_run_config,
                                  recommend_layout, resolve_model_config)
from propulsion_ds.method.propulsion import PropulsionConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["llama2-7b", "llama2-13b", "llama2-70b"]
OFFLOADS = [(False, False), (False, True), (True, True)]      # (offload_param, offload_optimizer)
CLUSTERS = [Cluster(1, 8), Cluster(4, 8), Cluster(2, 4)]


@pytest.fixture(scope="module")
def shapes():
    return {m: model_shape(ROOT / "configs/models" / m / "config.json", PropulsionConfig())
            for m in MODELS}


def _full(shape, zero, cluster):
    return method_plan("full", shape, zero, cluster, seq=2048, batch=1, checkpointing=True)


@pytest.mark.parametrize("model", MODELS)
def test_full_finetuning_model_states_match_deepspeed(shapes, model):
    shape = shapes[model]
    for offload_param, offload_opt in OFFLOADS:
        zero = ZeroSettings(stage=3, offload_param=offload_param, offload_optimizer=offload_opt)
        for cluster in CLUSTERS:
            ds_cpu, ds_gpu = deepspeed_reference(shape, zero, cluster)
            plan = _full(shape, zero, cluster)
            where = f"{model} {zero.describe()} {cluster}"
            assert abs(plan.model_states_gpu - ds_gpu) <= 0.05 * ds_gpu, where
            assert abs(plan.host_node - ds_cpu) <= 0.05 * ds_cpu, where


def test_agrees_with_all_cold_printout(shapes):
    """The numbers estimate_zero3_model_states_mem_needs_all_cold prints, parsed back."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    shape, cluster = shapes["llama2-70b"], Cluster(4, 8)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_cold(
            shape.total_params, shape.largest_module_params, cluster.gpus_per_node, cluster.nodes)
    rows = re.findall(r"([\d.]+)GB \|\s*([\d.]+)GB \| offload_param=([\w.]+)\s*, "
                      r"offload_optimizer=([\w.]+)\s*, zero_init=1", buf.getvalue())
    assert len(rows) == 3, buf.getvalue()
    for cpu_gb, gpu_gb, op, oo in rows:
        zero = ZeroSettings(stage=3, offload_param=op.endswith("cpu"),
                            offload_optimizer=oo.endswith("cpu"))
        plan = _full(shape, zero, cluster)
        assert plan.model_states_gpu / 2**30 == pytest.approx(float(gpu_gb), rel=0.05, abs=0.01)
        assert plan.host_node / 2**30 == pytest.approx(float(cpu_gb), rel=0.05, abs=0.01)


def test_counts(shapes):
    assert shapes["llama2-7b"].propulsion_trainable == 1_359_872
    assert shapes["llama2-13b"].propulsion_trainable == 2_129_920
    assert shapes["llama2-7b"].total_params == 6_738_415_616
    assert shapes["llama2-70b"].total_params == 68_976_648_192
    assert shapes["llama2-7b"].lora_trainable == 19_988_480          # LoRA r=8 on all 7 linears
    assert shapes["llama2-70b"].largest_module_params == 32000 * 8192


def test_propulsion_optimizer_state_13b(shapes):
    cluster = Cluster(1, 8)
    plan = method_plan("propulsion", shapes["llama2-13b"], ZeroSettings(stage=3), cluster,
                       seq=2048, batch=2, checkpointing=True)
    opt = [r for r in plan.rows if "optimizer" in r[0]]
    assert len(opt) == 1 and opt[0][2] == 12 * 2_129_920 // 8 and opt[0][3] == 0
    # offload_optimizer moves it to the host, the GPU keeps none
    off = method_plan("propulsion", shapes["llama2-13b"], ZeroSettings(stage=3, offload_optimizer=True),
                      cluster, seq=2048, batch=2, checkpointing=True)
    opt = [r for r in off.rows if "optimizer" in r[0]][0]
    assert opt[2] == 0 and opt[3] == 12 * 2_129_920 // 8
    # Propulsion's model states are a small fraction of full fine-tuning's
    full = _full(shapes["llama2-13b"], ZeroSettings(stage=3), cluster)
    assert plan.model_states_gpu < 0.15 * full.model_states_gpu


def test_checkpointing_reduces_activations(shapes):
    kw = dict(seq=2048, batch=2, hidden=5120, heads=40, layers=40)
    with_ck, without = activation_bytes(checkpointing=True, **kw), activation_bytes(checkpointing=False, **kw)
    assert 0 < with_ck < without / 10
    # checkpointed: each layer keeps its 16-bit input, plus one layer recomputed in full
    s, b, h, L = 2048, 2, 5120, 40
    assert with_ck == s * b * L * h * 2 + without // L
    plan = method_plan("propulsion", shapes["llama2-13b"], ZeroSettings(stage=3), Cluster(1, 8),
                       seq=2048, batch=2, checkpointing=False)
    assert plan.activations == plan.activations_full > plan.activations_ckpt


def test_stage2_replicates_parameters(shapes):
    shape = shapes["llama2-7b"]
    plan = method_plan("propulsion", shape, ZeroSettings(stage=2), Cluster(1, 8), seq=512, batch=1,
                       checkpointing=True)
    assert plan.rows[0][2] == 2 * shape.total_params


def test_run_configs_plan_and_fit():
    p70 = plan_from_run_config(ROOT / "configs/llama70b.json", nodes=4, gpus_per_node=8)
    assert p70.zero.stage == 3 and p70.zero.offload_param and p70.zero.offload_optimizer
    assert p70.shape.hidden_size == 8192 and p70.fits()
    assert p70.zero.reduce_bucket_size == 8192 * 8192          # "auto" filled as the engine does
    p13 = plan_from_run_config(ROOT / "configs/llama13b.json", nodes=1, gpus_per_node=8)
    assert p13.propulsion.trainable == 2_129_920 and not p13.zero.offload_param and p13.fits()


def test_model_config_resolution(tmp_path):
    assert resolve_model_config("/path/to/llama-2-70b-hf").parent.name == "llama2-70b"
    assert resolve_model_config("meta-llama/Llama-2-13b-hf").parent.name == "llama2-13b"
    assert resolve_model_config("assets/stories260K") == Path("assets/stories260K/config.json") \
        or (ROOT / "assets/stories260K").exists()
    with pytest.raises(PlanError, match="--model-config"):
        resolve_model_config(str(tmp_path / "no-such-model"))
    explicit = resolve_model_config("/whatever", str(ROOT / "configs/models/llama2-7b"))
    assert explicit.parent.name == "llama2-7b"


def _cli(*args):
    from helpers import run_cli

    return run_cli("estimate_memory", *args, env={"DS_ACCELERATOR": "cpu"}, timeout=120)


def test_cli_runs():
    r = _cli("--config", "configs/llama70b.json", "--nodes", "4", "--gpus-per-node", "8")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Fits an 80 GiB GPU: YES" in out
    assert "68,976,648,192" in out and "LoRA r=8" in out and "full fine-tuning" in out
    assert "estimate_zero3_model_states_mem_needs" in out


@pytest.mark.parametrize("args", [
    ("--config", "configs/llama70b.json", "--nodes", "0"),
    ("--nodes", "4"),
    ("--config", "configs/llama70b.json", "--gpus-per-node", "eight"),
])
def test_cli_bad_args_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2 and r.stdout == ""


def test_cli_bad_config_exit_2(tmp_path):
    r = _cli("--config", str(tmp_path / "missing.json"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "missing.json" in r.stderr
    r = _cli("--config", "configs/llama13b.json", "--model-config", str(tmp_path))
    assert r.returncode == 2 and "model config not found" in r.stderr


# --------------------------------------------------------------------------- activation table
def saved_bytes(model, **inputs):
    """Bytes autograd saves for backward in one forward of ``model(**inputs)`` (unique storages,
    parameters excluded)."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def _layer_bytes(cfg, method, dtype, seq=64, batch=2):
    """Saved bytes of one decoder layer: a 2-layer model minus a 1-layer model, same shape."""
    import torch
    from transformers import AutoModelForCausalLM
    from propulsion_ds import inject
    from bench import common
    counts = []
    for layers in (1, 2):
        c = copy.deepcopy(cfg)
        c.num_hidden_layers, c.use_cache, c._attn_implementation = layers, False, "sdpa"
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(c)
        for p in m.parameters():
            p.requires_grad_(method == "full")
        if method == "propulsion":
            inject(m, PropulsionConfig())
        elif method == "lora":
            from peft import get_peft_model
            m = get_peft_model(m, common.lora_config(8))
        m.to(dtype)                  # after the method, as DeepSpeed casts the whole module
        ids = torch.randint(0, c.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        counts.append(saved_bytes(m, input_ids=ids, labels=ids))
    return counts[1] - counts[0]


SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("method", ["propulsion", "lora", "full"])
@pytest.mark.parametrize("dtype_bytes", [4, 2])
@pytest.mark.parametrize("arch", ["stories260K", "smollm2-shape"])
def test_activation_table_matches_saved_tensors(method, dtype_bytes, arch):
    """The per-layer coefficients equal what autograd really saves, on the real stories260K shape
    (MHA-ish 8/4 heads, h=64) and SmolLM2-135M's shape (GQA 9/3, h=576, I=1536)."""
    import torch
    from transformers import AutoConfig, LlamaConfig
    cfg = (AutoConfig.from_pretrained(str(ROOT / "assets/stories260K")) if arch == "stories260K"
           else LlamaConfig(**SMOLLM2_SHAPE))
    seq, batch = 64, 2
    got = _layer_bytes(cfg, method, torch.float32 if dtype_bytes == 4 else torch.bfloat16, seq, batch)
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    want = activation_bytes(seq, batch, cfg.hidden_size, cfg.num_attention_heads, 1, False, dtype_bytes,
                            method=method, kv_dim=kv, intermediate=cfg.intermediate_size)
    assert got == pytest.approx(want, rel=0.03), (got, want)


# --------------------------------------------------------------------------- layout advice
def _advice(shapes, model, nodes, gpus, gib, **kw):
    batch = 2 if model == "llama2-70b" else 4
    return recommend_layout(shapes[model], Cluster(nodes, gpus), seq=2048, batch=batch,
                            checkpointing=True, gpu_memory_gib=gib, **kw)


@pytest.mark.parametrize("model,nodes,gpus,gib,layout", [
    ("llama2-7b", 1, 8, 80, "replicated"),
    ("llama2-13b", 1, 8, 80, "replicated"),
    ("llama2-70b", 1, 8, 80, "zero3"),            # one node: hpZ would be plain ZeRO-3
    ("llama2-7b", 4, 8, 80, "replicated"),
    ("llama2-13b", 4, 8, 80, "replicated"),
    ("llama2-70b", 4, 8, 80, "zero3_hpz"),
    ("llama2-13b", 1, 8, 40, "zero3"),            # 33 GiB replicated > 80% of 36 usable
    ("llama2-13b", 4, 8, 24, "zero3_hpz"),
    ("llama2-7b", 1, 8, 24, "zero3"),
    ("llama2-70b", 4, 8, 24, "zero3"),            # hpZ's secondary copy (P*2/8 = 16 GiB) too big
    ("llama2-70b", 1, 8, 24, "zero3_offload"),
    ("llama2-7b", 1, 1, 16, "zero3_offload"),     # one GPU: only offload saves memory
])
def test_layout_advice(shapes, model, nodes, gpus, gib, layout):
    a = _advice(shapes, model, nodes, gpus, gib)
    assert a.layout == layout, (a.layout, a.reason)
    assert a.overrides[0] == f"deepspeed={DEEPSPEED_CONFIGS[layout]}"
    if layout == "zero3_hpz":
        assert a.overrides[1] == f"deepspeed.zero_optimization.zero_hpz_partition_size={gpus}"
    else:
        assert len(a.overrides) == 1
    # the rule itself: replicate exactly when the replicated run fits with the headroom
    limit = a.usable_bytes * (1 - REPLICATE_HEADROOM)
    assert (a.need_bytes["replicated"] <= limit) == (layout == "replicated")
    if layout != "replicated":
        assert a.need_bytes[layout] <= a.usable_bytes


def test_layout_nothing_fits(shapes):
    a = _advice(shapes, "llama2-70b", 1, 1, 8)
    assert a.layout == "none" and a.overrides == [] and a.deepspeed is None
    assert "max_length" in a.reason


def test_hpz_costs_a_secondary_copy(shapes):
    shape, c = shapes["llama2-70b"], Cluster(4, 8)
    kw = dict(seq=2048, batch=2, checkpointing=True)
    plain = method_plan("propulsion", shape, layout_zero("zero3", c, shape.hidden_size), c, **kw)
    hpz = method_plan("propulsion", shape, layout_zero("zero3_hpz", c, shape.hidden_size), c, **kw)
    extra = hpz.total_gpu - plain.total_gpu
    assert extra == pytest.approx(2 * (shape.total_params + shape.propulsion_trainable) / 8, rel=1e-6)


@pytest.mark.parametrize("layout", ["replicated", "zero3", "zero3_hpz", "zero3_offload"])
def test_shipped_layout_configs_are_what_the_planner_assumes(tmp_path, layout):
    """Each recommended --set line, applied to a real run config, gives the ZeRO settings the
    planner costed (stage, hpZ group, offload) and a config DeepSpeed itself accepts."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from propulsion_ds.config.load import load_config
    from propulsion_ds.config.deepspeed import resolve_deepspeed
    shape = model_shape(ROOT / "configs/models/llama2-7b/config.json", PropulsionConfig())
    c = Cluster(4, 4)
    advice_overrides = [f"deepspeed={DEEPSPEED_CONFIGS[layout]}"]
    if layout == "zero3_hpz":
        advice_overrides.append("deepspeed.zero_optimization.zero_hpz_partition_size=4")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(ROOT / "configs/llama7b.json", advice_overrides, check_files=False)
        ds = resolve_deepspeed(cfg, c.gpus, shape.hidden_size)
        ds1 = resolve_deepspeed(cfg, 1, shape.hidden_size)   # DeepSpeedConfig without a process group
    finally:
        os.chdir(cwd)
    got, want = ZeroSettings.from_deepspeed(ds), layout_zero(layout, c, shape.hidden_size)
    assert got == want
    dsc = DeepSpeedConfig(ds1)
    assert dsc.zero_optimization_stage == want.stage
    assert dsc.zero_config.zero_hpz_partition_size == want.hpz_partition_size


def test_cli_prints_the_layout_advice():
    r = _cli("--config", "configs/llama70b.json", "--nodes", "4", "--gpus-per-node", "8")
    assert r.returncode == 0, r.stderr
    assert ("use: --set deepspeed=configs/deepspeed/zero3_hpz.json "
            "--set deepspeed.zero_optimization.zero_hpz_partition_size=8") in r.stdout
    r = _cli("--config", "configs/llama13b.json", "--nodes", "1", "--gpus-per-node", "8")
    assert r.returncode == 0, r.stderr
    assert "recommended: replicated frozen base (ZeRO-2)" in r.stdout
    assert "use: --set deepspeed=configs/deepspeed/zero2.json" in r.stdout
