"""The shipped cluster configs: LLaMA-2 7B/13B/70B shapes, Propulsion counts, loadable run configs."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from propulsion_ds.config.load import load_config
from propulsion_ds.config.deepspeed import resolve_deepspeed  # noqa: E402
from propulsion_ds.method.propulsion import get_state, inject  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama2-70b"}


def _expected_70b(cfg: dict) -> int:
    """Sum of d_out over the 7 linears of each of the 80 decoder layers, from config numbers."""
    h, f, a, kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                   cfg["num_key_value_heads"])
    head_dim = h // a
    per_layer = (a * head_dim) + 2 * (kv * head_dim) + h + 2 * f + h   # q, k+v, o, gate+up, down
    return cfg["num_hidden_layers"] * per_layer


EXPECTED = {"7b": 1_359_872, "13b": 2_129_920}


@pytest.mark.parametrize("size", list(RUNS))
def test_meta_model_trainable_count(size):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = ROOT / "configs/models" / RUNS[size]
    raw = json.loads((model_dir / "config.json").read_text())
    run = load_config(ROOT / f"configs/llama{size}.json", check_files=False)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = inject(model, run.propulsion)
    assert len(names) == 7 * raw["num_hidden_layers"]
    count = get_state(model).trainable_count
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == count
    want = EXPECTED.get(size) or _expected_70b(raw)
    assert count == want, (size, count, want)
    if size == "70b":
        assert count == 6_717_440


def test_model_configs_are_llama2():
    dims = {"llama2-7b": (4096, 11008, 32, 32, 32), "llama2-13b": (5120, 13824, 40, 40, 40),
            "llama2-70b": (8192, 28672, 80, 64, 8)}
    for name, (h, f, L, a, kv) in dims.items():
        c = json.loads((ROOT / "configs/models" / name / "config.json").read_text())
        assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                c["num_attention_heads"], c["num_key_value_heads"]) == (h, f, L, a, kv)
        assert c["vocab_size"] == 32000 and c["model_type"] == "llama"
        assert c["tie_word_embeddings"] is False
        assert not any(p.name.endswith((".safetensors", ".bin")) for p in (ROOT / "configs/models" / name).iterdir())


@pytest.mark.parametrize("size", list(RUNS))
def test_run_config_loads_and_resolves(size, tmp_path):
    path = ROOT / f"configs/llama{size}.json"
    raw = json.loads(path.read_text())
    assert raw["model"]["dtype"] == "bf16" and raw["model"]["gradient_checkpointing"] is True
    assert raw["propulsion"]["degree"] == 15 and raw["propulsion"]["targets"] == "all-linear"
    assert raw["data"]["format"] == "instruction"
    # relative to the config file's own directory (configs/)
    assert raw["deepspeed"] == ("deepspeed/zero3_offload.json" if size == "70b" else "deepspeed/zero3.json")

    # As shipped, the placeholder model path fails the file checks, naming the field.
    with pytest.raises(ValueError, match="model.name_or_path"):
        load_config(path)

    data = tmp_path / "instructions.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)           # paths written in a config resolve against its directory, from any cwd
    try:
        cfg = load_config(path, [f"model.name_or_path={ROOT / 'assets/stories260K'}", f"data.train={data}"])
        hidden = json.loads((ROOT / "configs/models" / RUNS[size] / "config.json").read_text())["hidden_size"]
        ds = resolve_deepspeed(cfg, 1, hidden)
    finally:
        os.chdir(cwd)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    offload = ds["zero_optimization"].get("offload_param", {}).get("device")
    assert offload == ("cpu" if size == "70b" else None)

    from deepspeed.runtime.config import DeepSpeedConfig
    dsc = DeepSpeedConfig(ds)
    assert dsc.zero_optimization_stage == 3 and dsc.bfloat16_config.enabled


def test_zero2_and_offload_deepspeed_json(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for name, stage in (("zero2", 2), ("zero3_offload", 3), ("zero3", 3)):
            cfg = load_config(ROOT / "configs/llama7b.json",
                              ["model.name_or_path=assets/stories260K", "data.format=text",
                               "data.train=assets/data/tinyshakespeare.txt",
                               f"deepspeed=configs/deepspeed/{name}.json"])
            ds = resolve_deepspeed(cfg, 1, 64)
            dsc = DeepSpeedConfig(ds)
            assert dsc.zero_optimization_stage == stage
            if name == "zero3_offload":
                z = ds["zero_optimization"]
                assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
                assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("size", list(RUNS))
def test_set_max_steps_replaces_the_shipped_epochs(size, caplog):
    """The cluster configs train by epochs; ``--set train.max_steps=N`` wins, with a log line."""
    path = ROOT / f"configs/llama{size}.json"
    assert json.loads(path.read_text())["train"]["epochs"] is not None
    with caplog.at_level("INFO", logger="propulsion_ds.config.load"):
        run = load_config(path, ["train.max_steps=7"], check_files=False)
    assert (run.train.max_steps, run.train.epochs) == (7, None)
    assert any("train.max_steps=7 (--set) replaces the config file's train.epochs=" in r.getMessage()
               for r in caplog.records), caplog.text


def test_both_in_one_place_stay_a_contradiction(tmp_path):
    from propulsion_ds.config import ConfigError

    raw = json.loads((ROOT / "configs/llama7b.json").read_text())
    raw["train"]["max_steps"] = 10
    both = tmp_path / "both.json"
    both.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="set max_steps or epochs, not both"):
        load_config(both, check_files=False)
    with pytest.raises(ConfigError, match="set max_steps or epochs, not both"):
        load_config(ROOT / "configs/llama7b.json", ["train.max_steps=5", "train.epochs=2"], check_files=False)
