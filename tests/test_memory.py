"""Memory planner: agreement with DeepSpeed's ZeRO-3 estimator, sanity, and the CLI."""
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from propulsion_ds.memory import (Cluster, PlanError, ZeroSettings, activation_bytes,  # noqa: E402
                                  deepspeed_reference, method_plan, model_shape,
                                  plan_from_run_config, resolve_model_config)
from propulsion_ds.propulsion import PropulsionConfig  # noqa: E402

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
    # Korthikanti eq. 1 per layer, 16-bit: s*b*h*(34 + 5*a*s/h)
    s, b, h, a, L = 2048, 2, 5120, 40, 40
    assert without == int(L * s * b * h * (34 + 5 * a * s / h))
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
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, str(ROOT / "launch/estimate_memory.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


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
