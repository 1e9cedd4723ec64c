"""launch/export.py: Propulsion adapter -> peft IA3, and adapter <- DeepSpeed resume checkpoint.

peft side: real peft 0.21 loads the export with ``PeftModel.from_pretrained``; its logits must
equal the base model with our adapter (relative 1e-6 in fp32; bf16 measured, bit-identical when
both sides multiply by the same fp32 scale), and its ``merge_and_unload`` must give our merge's
weights. Checkpoint side: the real trainer on 2 ranks under ZeRO-3 with every parameter
partitioned (stage3_param_persistence_threshold 0) and under ZeRO-2 bf16; the exported adapter
of the last step must equal, bit for bit, the adapter the run itself wrote.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ARCH, random_z, set_z
from helpers import ROOT, free_port, run_train, small_text_file, tail, train_env

from propulsion_ds.method.adapter import load_adapter, read_adapter_weights, save_adapter
from propulsion_ds.tools.export_peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_peft
from propulsion_ds.method.propulsion import PropulsionConfig, get_state, inject, merge_and_unload

EXPORT = ROOT / "launch" / "export.py"
FP32_REL = 1e-6


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPORT), *map(str, args)], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)


def errors(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln
            and "warnings.warn" not in ln and "[WARNING]" not in ln]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


def load_base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def saved_base(arch_name: str, tmp: Path) -> Path:
    """The architecture's (deterministic) test model as a directory, the way users have a base."""
    if arch_name == "stories260K":
        return ROOT / "assets" / "stories260K"
    d = tmp / arch_name
    if not d.exists():
        ARCH[arch_name].build().save_pretrained(str(d))
    return d


def trained_adapter(base_dir: Path, pcfg: PropulsionConfig, out: Path, seed=0, bf16_exact=False) -> Path:
    """An adapter with z spread around 1 (as after training), written by save_adapter."""
    model = load_base(base_dir)
    names = inject(model, pcfg)
    zs = random_z(model, names, pcfg.num_vectors, seed=seed)
    if bf16_exact:      # z - 1 representable in bf16: a bf16 model then holds the same z
        zs = {n: 1.0 + (z - 1.0).to(torch.bfloat16).double() for n, z in zs.items()}
    set_z(model, zs)
    return save_adapter(model, out)


def ids_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=g)


def compare(base_dir: Path, adapter: Path, peft_dir: Path, dtype) -> dict:
    """Logits and merged weights: ours (load_adapter / merge_and_unload) against peft's."""
    from peft import PeftModel

    ours = load_adapter(load_base(base_dir, dtype), adapter)
    theirs = PeftModel.from_pretrained(load_base(base_dir, dtype), str(peft_dir)).eval()
    plain = load_base(base_dir, dtype)
    ids = ids_for(plain)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits.float() for m in (ours, theirs, plain))
    ours_m, theirs_m = merge_and_unload(ours).state_dict(), theirs.merge_and_unload().state_dict()
    assert ours_m.keys() == theirs_m.keys()
    return {"rel": rel(a, b), "identical": torch.equal(a, b), "moved": rel(c, a),
            "merge_max": max(float((ours_m[k].float() - theirs_m[k].float()).abs().max()) for k in ours_m),
            "merge_identical": all(torch.equal(ours_m[k], theirs_m[k]) for k in ours_m)}


# ------------------------------------------------------------------------------ peft: cases
PEFT_CASES = [
    pytest.param("stories260K", PropulsionConfig(), id="stories260K-all-linear"),
    pytest.param("stories260K", PropulsionConfig(num_vectors=3, degree=7), id="stories260K-n3"),
    pytest.param("stories260K", PropulsionConfig(targets="attention", lm_head=True), id="stories260K-attn+head"),
    pytest.param("qwen2", PropulsionConfig(), id="qwen2-biases"),
    pytest.param("gpt2", PropulsionConfig(), id="gpt2-conv1d"),
]


@pytest.mark.parametrize("arch,pcfg", PEFT_CASES)
def test_peft_export_loads_and_matches(arch, pcfg, tmp_path, capsys):
    from peft import IA3Config, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    base_dir = saved_base(arch, tmp_path)
    adapter = trained_adapter(base_dir, pcfg, tmp_path / "adapter")
    r = export_peft(adapter, tmp_path / "peft", base=base_dir)
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG_FILE).read_text())
    targets = list(json.loads((adapter / "propulsion_config.json").read_text())["targets"])
    assert cfg["peft_type"] == "IA3" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["feedforward_modules"] == [] and cfg["target_modules"] == targets
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and r.fan_in_fan_out is (arch == "gpt2")
    assert cfg["base_model_name_or_path"] == str(base_dir)

    # peft's own key names: what get_peft_model_state_dict gives for this config on this model.
    sd = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS_FILE))
    reference = get_peft_model_state_dict(get_peft_model(load_base(base_dir), IA3Config(**{
        k: v for k, v in cfg.items() if k not in ("peft_type", "auto_mapping", "revision")})))
    # (peft also saves lm_head.base_layer.weight when lm_head is a target, its save_embedding_layers
    # default for a possibly resized vocabulary; the base model already has that weight.)
    assert sorted(sd) == sorted(k for k in reference if k.endswith(".ia3_l"))
    assert all(sd[k].shape == reference[k].shape and sd[k].dtype == torch.float32 for k in sd)
    # ia3_l = mean_i z_i**k, from the adapter file's z, in float64 as the independent reference.
    z = read_adapter_weights(adapter)
    n, k = pcfg.num_vectors, pcfg.degree
    for name in targets:
        want = (z[name + ".propulsion"].double().reshape(n, -1) ** k).mean(0)
        got = sd[f"base_model.model.{name}.ia3_l"].double().flatten()
        assert torch.allclose(got, want, rtol=1e-6, atol=0), name

    m = compare(base_dir, adapter, tmp_path / "peft", torch.float32)
    with capsys.disabled():
        print(f"\n[{arch} {pcfg}] fp32: logits rel diff {m['rel']:.2e} (identical {m['identical']}), "
              f"adapter moves logits by {m['moved']:.2e}; merge max |diff| {m['merge_max']:.2e} "
              f"(identical {m['merge_identical']})")
    assert m["moved"] > 1e-3                     # the adapter does something peft must reproduce
    assert m["rel"] <= FP32_REL
    assert m["merge_max"] <= 1e-6


def test_peft_bf16(tmp_path, capsys):
    """bf16 base: peft and our hook both compute (y_bf16 -> fp32) * fp32 scale -> bf16, so with the
    same scale the logits are bit-identical. A bf16 model holds our delta in bf16 (load_adapter
    rounds z - 1), while peft's ia3_l keeps fp32 z**k: with an arbitrary fp32 z the two scales
    differ by that rounding, and so do the logits (measured, not asserted equal)."""
    base_dir = saved_base("stories260K", tmp_path)
    rows = {}
    for name, exact in (("bf16-representable z - 1", True), ("arbitrary fp32 z", False)):
        adapter = trained_adapter(base_dir, PropulsionConfig(), tmp_path / name / "adapter", bf16_exact=exact)
        export_peft(adapter, tmp_path / name / "peft")
        rows[name] = compare(base_dir, adapter, tmp_path / name / "peft", torch.bfloat16)
    with capsys.disabled():
        for name, m in rows.items():
            print(f"\n[stories260K bf16, {name}] logits rel diff {m['rel']:.2e} (identical {m['identical']}); "
                  f"merge max |diff| {m['merge_max']:.2e} (identical {m['merge_identical']})")
    exact = rows["bf16-representable z - 1"]
    assert exact["identical"] and exact["merge_identical"]
    assert rows["arbitrary fp32 z"]["rel"] < 5e-2


def test_cli_contract_and_one_way_note(tmp_path):
    """The contract command line, with the base the adapter records."""
    from peft import PeftModel

    adapter = trained_adapter(ROOT / "assets" / "stories260K", PropulsionConfig(num_vectors=2), tmp_path / "adapter")
    proc = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 0, tail(proc.stderr)
    assert "one-way" in proc.stdout
    assert "cannot be recovered" in (tmp_path / "peft" / "README.md").read_text()
    PeftModel.from_pretrained(load_base(ROOT / "assets" / "stories260K"), str(tmp_path / "peft"))
    again = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / "peft")
    assert again.returncode == 2 and len(errors(again)) == 1 and "--overwrite" in errors(again)[0]


@pytest.mark.parametrize("pcfg,setting", [
    (PropulsionConfig(embeddings=True), "propulsion.embeddings"),
    (PropulsionConfig(train_bias=True), "propulsion.train_bias"),
    (PropulsionConfig(targets=["embed_tokens", "q_proj"]), "embedding"),
], ids=["embeddings", "train_bias", "embedding-target"])
def test_peft_refuses_what_ia3_cannot_express(pcfg, setting, tmp_path):
    adapter = trained_adapter(ROOT / "assets" / "stories260K", pcfg, tmp_path / "adapter")
    proc = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / "peft")
    lines = errors(proc)
    assert proc.returncode == 2 and len(lines) == 1 and setting in lines[0], proc.stderr
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("arch,refused", [("llama-tied", True), ("stories260K", False)])
def test_peft_refuses_scaled_tied_lm_head(arch, refused, tmp_path):
    """A scaled lm_head on a tied model: peft's merge_and_unload would scale the one shared weight
    (the embedding too), so the export refuses it in one line, as the merge does without --untie.
    The untied model with the same settings exports."""
    base_dir = saved_base(arch, tmp_path)
    adapter = trained_adapter(base_dir, PropulsionConfig(targets="attention", lm_head=True), tmp_path / "adapter")
    proc = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / "peft", "--base", base_dir)
    if not refused:
        assert proc.returncode == 0, tail(proc.stderr)
        return
    lines = errors(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "tie_word_embeddings" in lines[0] and "lm_head" in lines[0]
    assert not (tmp_path / "peft").exists()


def test_peft_refuses_trained_bias_keys(tmp_path):
    """An adapter that carries trained biases (``<module>.bias`` beside the z's) is refused even
    if its config does not say train_bias."""
    from safetensors.torch import load_file, save_file

    adapter = trained_adapter(ROOT / "assets" / "stories260K", PropulsionConfig(), tmp_path / "adapter")
    sd = load_file(str(adapter / "propulsion.safetensors"))
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, str(adapter / "propulsion.safetensors"), metadata={"format": "pt", "format_version": "1"})
    proc = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 2 and len(errors(proc)) == 1 and "train_bias" in errors(proc)[0], proc.stderr


@pytest.mark.parametrize("make,needle", [
    (lambda t: ["--checkpoint", t / "nope"], "directory not found"),
    (lambda t: ["--checkpoint", t / "run" / "checkpoints" / "step_2"], "meta.json"),
    (lambda t: ["--checkpoint", t / "norun" / "checkpoints" / "step_2"], "config.json"),
    (lambda t: ["--adapter", t / "nope", "--to", "peft"], "directory not found"),
    (lambda t: ["--adapter", t / "run", "--to", "peft"], "propulsion_config.json"),
], ids=["missing-dir", "not-a-checkpoint", "missing-config", "missing-adapter", "not-an-adapter"])
def test_bad_input_one_line(make, needle, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_2").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    step = tmp_path / "norun" / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    proc = export_cli(*make(tmp_path), "--out", tmp_path / "out")
    lines = errors(proc)
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_written_files_follow_the_umask(mask, tmp_path):
    """The adapter (as training writes it), a merged model and a peft export get 0o666 & ~umask
    like every other file of a run directory, although safetensors creates its files 0600."""
    from propulsion_ds.tools.merge import merge

    base_dir = ROOT / "assets" / "stories260K"
    old = os.umask(mask)
    try:
        adapter = trained_adapter(base_dir, PropulsionConfig(), tmp_path / "adapter")
        merge(base_dir, adapter, tmp_path / "merged", verify=False)
        export_peft(adapter, tmp_path / "peft", base=base_dir)
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    files = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for d in ("adapter", "merged", "peft") for p in (tmp_path / d).rglob("*") if p.is_file()}
    assert "adapter/propulsion.safetensors" in files and "peft/adapter_model.safetensors" in files
    assert any(f.startswith("merged/") and f.endswith(".safetensors") for f in files)
    assert {f: m for f, m in files.items() if m != want} == {}, oct(want)


# ------------------------------------------------------------------------------ from checkpoints
def _train(tmp: Path, name: str, ds: dict, dtype: str) -> Path:
    small_text_file(tmp / "train.txt", 60_000)
    (tmp / f"{name}.json").write_text(json.dumps(ds))
    out = tmp / name
    proc = run_train(["--config", ROOT / "configs" / "tiny.json",
                      "--set", f"deepspeed={tmp / f'{name}.json'}", "--set", f"model.dtype={dtype}",
                      "--set", f"data.train={tmp / 'train.txt'}", "--set", "data.max_length=64",
                      "--set", "train.max_steps=4", "--set", "train.warmup_steps=0",
                      "--set", "train.micro_batch_size=4",
                      "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=3",
                      "--set", "eval.every_steps=4", "--set", "eval.max_batches=2",
                      "--set", f"output_dir={out}"], nproc=2, port=free_port())
    assert proc.returncode == 0, tail(proc.stderr)
    return out


def _ds(stage: int) -> dict:
    ds = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0   # partition everything
    return ds


def _check_export(run: Path, tmp: Path, stage: int):
    from safetensors.torch import load_file

    step4 = run / "checkpoints" / "step_4"
    opt = sorted(step4.glob("*optim_states.pt"))
    assert len(opt) == 2                                # one partition per rank
    proc = export_cli("--checkpoint", step4, "--out", tmp / "exported")
    assert proc.returncode == 0, tail(proc.stderr)
    assert f"ZeRO-{stage}" in proc.stdout
    ours, theirs = load_file(str(run / "adapter" / "propulsion.safetensors")), \
        load_file(str(tmp / "exported" / "propulsion.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, theirs[k]) for k, v in ours.items())
    assert all(bool((v != 1).any()) for v in ours.values())           # it trained
    assert json.loads((run / "adapter" / "propulsion_config.json").read_text()) == \
        json.loads((tmp / "exported" / "propulsion_config.json").read_text())
    # An earlier step: a different adapter, and one load_adapter / merge take.
    proc = export_cli("--checkpoint", run / "checkpoints" / "step_2", "--out", tmp / "step2")
    assert proc.returncode == 0, tail(proc.stderr)
    early = load_file(str(tmp / "step2" / "propulsion.safetensors"))
    assert any(not torch.equal(early[k], ours[k]) for k in ours)
    model = load_adapter(load_base(ROOT / "assets" / "stories260K"), tmp / "step2")
    assert get_state(model).trainable_count == sum(v.numel() for v in early.values())
    return ours


@pytest.mark.slow
def test_export_from_zero3_checkpoint_two_ranks(tmp_path):
    run = _train(tmp_path, "z3", _ds(3), "fp32")
    ours = _check_export(run, tmp_path, 3)
    # Really partitioned: each rank's optimizer file holds half of the fp32 vector.
    from propulsion_ds.train.safe_load import safe_torch_load
    part = safe_torch_load(sorted((run / "checkpoints" / "step_4").glob("*optim_states.pt"))[0])
    held = sum(t.numel() for t in part["optimizer_state_dict"]["fp32_flat_groups"])
    assert held * 2 >= sum(v.numel() for v in ours.values()) > held
    # Straight from the checkpoint to peft.
    proc = export_cli("--checkpoint", run / "checkpoints" / "step_4", "--to", "peft", "--out", tmp_path / "peft")
    assert proc.returncode == 0, tail(proc.stderr)
    m = compare(ROOT / "assets" / "stories260K", tmp_path / "exported", tmp_path / "peft", torch.float32)
    assert m["rel"] <= FP32_REL


@pytest.mark.slow
def test_export_from_zero2_bf16_checkpoint_two_ranks(tmp_path):
    run = _train(tmp_path, "z2", _ds(2), "bf16")
    _check_export(run, tmp_path, 2)


# ------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2_dir():
    script = ROOT / "scripts" / "fetch_smollm2.sh"
    if not script.is_file():
        pytest.skip("scripts/fetch_smollm2.sh is not there")
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_dir():
        pytest.skip(f"fetch_smollm2.sh failed (rc {proc.returncode}): {tail(proc.stderr, 3)}")
    return Path(lines[-1])


@pytest.mark.slow
@pytest.mark.smollm2
def test_peft_export_smollm2(smollm2_dir, tmp_path, capsys):
    rows = {}
    for name, exact in (("bf16-representable z - 1", True), ("arbitrary fp32 z", False)):
        adapter = trained_adapter(smollm2_dir, PropulsionConfig(), tmp_path / name / "adapter", bf16_exact=exact)
        proc = export_cli("--adapter", adapter, "--to", "peft", "--out", tmp_path / name / "peft")
        assert proc.returncode == 0, tail(proc.stderr)
        for dt in (torch.float32, torch.bfloat16):
            rows[name, dt] = compare(smollm2_dir, adapter, tmp_path / name / "peft", dt)
    # How far bf16 alone moves our own model's logits (the scale of bf16 noise on this model).
    ours32 = load_adapter(load_base(smollm2_dir), tmp_path / "arbitrary fp32 z" / "adapter")
    ours16 = load_adapter(load_base(smollm2_dir, torch.bfloat16), tmp_path / "arbitrary fp32 z" / "adapter")
    ids = ids_for(ours32)
    with torch.no_grad():
        noise = rel(ours32(input_ids=ids).logits, ours16(input_ids=ids).logits)
    with capsys.disabled():
        for (name, dt), m in rows.items():
            print(f"\n[SmolLM2-135M {dt}, {name}] logits rel diff {m['rel']:.2e} (identical {m['identical']}), "
                  f"adapter moves logits by {m['moved']:.2e}; merge max |diff| {m['merge_max']:.2e} "
                  f"(identical {m['merge_identical']})")
        print(f"[SmolLM2-135M] our own bf16 vs fp32 logits: rel {noise:.2e}")
    for name in ("bf16-representable z - 1", "arbitrary fp32 z"):
        assert rows[name, torch.float32]["rel"] <= FP32_REL and rows[name, torch.float32]["merge_max"] <= 1e-6
    assert rows["bf16-representable z - 1", torch.bfloat16]["identical"]
    assert rows["bf16-representable z - 1", torch.bfloat16]["merge_identical"]
    assert rows["arbitrary fp32 z", torch.bfloat16]["rel"] <= 2 * noise
