"""Run-config loading: valid round-trip, one-line errors naming the field, overrides,
DeepSpeed "auto" resolution, and a property test that bad input only ever raises ConfigError."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MODEL_DIR, ROOT as REPO, write_config
from propulsion_ds.config import ConfigError, RunConfig
from propulsion_ds.config.load import apply_overrides, config_from_dict, config_to_dict, load_config
from propulsion_ds.config.paths import expand_data_paths
from propulsion_ds.config.deepspeed import resolve_deepspeed

# Absolute: paths written in a config file resolve against that file's directory (tmp_path here).
MODEL = str(MODEL_DIR)
TEXT = str(REPO / "assets/data/tinyshakespeare.txt")
ZERO3 = str(REPO / "configs/deepspeed/zero3.json")


@pytest.fixture(autouse=True, scope="module")
def _in_repo_root():
    """Config paths are relative to the working directory; the tests use the repo's assets."""
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


def valid_raw() -> dict:
    return {
        "model": {"name_or_path": MODEL, "dtype": "fp32"},
        "propulsion": {"degree": 15, "targets": "all-linear"},
        "data": {"train": TEXT, "max_length": 64},
        "train": {"lr": 0.01, "max_steps": 10, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 3},
        "output_dir": "out/test-config",
        "deepspeed": ZERO3,
    }


def write(tmp_path: Path, raw, name: str = "run.json") -> Path:
    return write_config(tmp_path / name, raw)


def assert_one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert msg.splitlines() == [msg], f"not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------ valid configs
def test_valid_config_loads_and_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, valid_raw()))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name_or_path == MODEL
    assert cfg.train.max_steps == 10 and cfg.train.epochs is None
    assert cfg.propulsion.degree == 15
    assert cfg.tokenizer_path == MODEL
    assert cfg.deepspeed == ZERO3                      # paths are kept as written
    # Defaults fill what the file leaves out; an int given for a float field becomes a float.
    assert cfg.distributed.timeout_minutes == 30.0
    raw = valid_raw()
    raw["train"]["lr"] = 1
    assert type(load_config(write(tmp_path, raw)).train.lr) is float

    saved = config_to_dict(cfg)
    assert json.loads(json.dumps(saved)) == saved      # plain JSON
    again = load_config(write(tmp_path, saved, "saved.json"))
    assert again == cfg
    assert config_to_dict(again) == saved


def test_epochs_list_of_data_and_inline_deepspeed(tmp_path):
    raw = valid_raw()
    del raw["train"]["max_steps"]
    raw["train"]["epochs"] = 2
    # assets/data holds .jsonl files beside the .txt: one data set is one kind of file, refused
    # at validation as the loader would refuse it.
    raw["data"]["train"] = [TEXT, str(REPO / "assets/data/*.txt"), str(REPO / "assets/data")]
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, "data.train: mixes file types (json, text)")
    texts = tmp_path / "texts"
    (texts / "more").mkdir(parents=True)
    (texts / "more" / "b.txt").write_text(Path(TEXT).read_text()[:2000])
    (texts / "a.txt").write_text(Path(TEXT).read_text()[2000:4000])
    raw["data"]["train"] = [TEXT, str(REPO / "assets/data/*.txt"), str(texts)]
    raw["data"]["eval"] = TEXT
    raw["deepspeed"] = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    raw["resume"] = "auto"
    cfg = load_config(write(tmp_path, raw))
    assert cfg.train.epochs == 2 and cfg.resume == "auto"
    files = expand_data_paths(cfg.data.train)
    assert files == [TEXT, TEXT, str(texts / "a.txt"), str(texts / "more" / "b.txt")]


def test_saved_dataset_directory_is_accepted(tmp_path):
    saved = tmp_path / "ds"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    assert expand_data_paths(str(saved)) == [str(saved)]
    data_dir = tmp_path / "files"
    data_dir.mkdir()
    (data_dir / "b.jsonl").write_text('{"text": "x"}\n')
    (data_dir / "a.json").write_text('[{"text": "x"}]')
    (data_dir / "notes.md").write_text("ignored")
    assert expand_data_paths(str(data_dir)) == [str(data_dir / "a.json"), str(data_dir / "b.jsonl")]


# ------------------------------------------------------------------------------ bad configs
def _set(path: str, value):
    def mutate(raw):
        node = raw
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def _drop(path: str):
    def mutate(raw):
        node = raw
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


def _both(*mutations):
    def mutate(raw):
        for m in mutations:
            m(raw)
    return mutate


BAD_CASES = {
    "unknown key with suggestion": (_set("train.lrr", 0.1),
                                    ["unknown key 'train.lrr'", "did you mean 'train.lr'?"]),
    "unknown section": (_set("trian.lr", 0.1), ["unknown key 'trian'", "'train'"]),
    "key in the wrong section": (_set("lr", 0.1), ["unknown key 'lr'", "'train.lr'"]),
    "wrong type": (_set("train.max_steps", "ten"),
                   ["train.max_steps: expected an integer", "'ten' (str)"]),
    "bool is not an int": (_set("train.micro_batch_size", True), ["train.micro_batch_size", "bool"]),
    "float is not an int": (_set("train.max_steps", 10.5), ["train.max_steps", "float"]),
    "section not an object": (_set("eval", [1]), ["eval: expected an object"]),
    "non-finite float": (_set("train.lr", float("nan")), ["train.lr", "finite"]),
    "lr out of range": (_set("train.lr", 0), ["train.lr", "> 0"]),
    "weight decay out of range": (_set("train.weight_decay", -0.1), ["train.weight_decay", ">= 0"]),
    "max_length out of range": (_set("data.max_length", 4), ["data.max_length", ">= 8"]),
    "eval fraction out of range": (_set("data.eval_fraction", 1.0), ["data.eval_fraction", "< 1"]),
    "timeout out of range": (_set("distributed.timeout_minutes", 0), ["distributed.timeout_minutes"]),
    "keep_last out of range": (_set("checkpoint.keep_last", 0), ["checkpoint.keep_last", ">= 1"]),
    "bad dtype choice": (_set("model.dtype", "bf17"), ["model.dtype", "bf16", "'bf17'"]),
    "bad format choice": (_set("data.format", "csv"), ["data.format", "instruction"]),
    "bad schedule choice": (_set("train.schedule", "step"), ["train.schedule", "cosine"]),
    "bad resume choice": (_set("resume", "yes"), ["resume", "auto"]),
    "propulsion validates itself": (_set("propulsion.degree", 0), ["propulsion.degree"]),
    "propulsion bad targets": (_set("propulsion.targets", "everything"), ["propulsion.targets"]),
    "propulsion empty targets": (_set("propulsion.targets", []), ["propulsion.targets"]),
    # "./": a path, not a Hub id (org/name, which is resolved later through the HF cache)
    "missing model dir": (_set("model.name_or_path", "./assets/no-such-model"),
                          ["model.name_or_path", "assets/no-such-model"]),
    "model dir without config.json": (_set("model.name_or_path", str(REPO / "assets/data")),
                                      ["model.name_or_path", "config.json"]),
    "missing tokenizer dir": (_set("tokenizer.name_or_path", "./nope/tok"), ["tokenizer.name_or_path"]),
    "glob matching nothing": (_set("data.train", "assets/data/*.no-such-ext"),
                              ["data.train", "assets/data/*.no-such-ext", "matches no files"]),
    "missing data file": (_set("data.eval", ["assets/data/nope.txt"]),
                          ["data.eval[0]", "assets/data/nope.txt"]),
    "unsupported data file": (_set("data.train", "setup.py"), ["data.train", "setup.py"]),
    "data.train unset": (_drop("data.train"), ["data.train", "must be set"]),
    "text file for chat format": (_set("data.format", "chat"), ["data.train", "chat"]),
    "eval and eval_fraction": (_both(_set("data.eval", TEXT), _set("data.eval_fraction", 0.1)),
                               ["data: set eval or eval_fraction, not both"]),
    "bad deepspeed path": (_set("deepspeed", "configs/deepspeed/nope.json"),
                           ["deepspeed", "configs/deepspeed/nope.json"]),
    "deepspeed not a dict": (_set("deepspeed", 3), ["deepspeed: expected a string or an object"]),
    "max_steps and epochs": (_set("train.epochs", 2),
                             ["train: set max_steps or epochs, not both"]),
    "neither max_steps nor epochs": (_drop("train.max_steps"), ["train: set one of them"]),
    "offload_param with stage 2": (
        _set("deepspeed", {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}),
        ["deepspeed.zero_optimization.offload_param", "stage 3"]),
    "offload_optimizer with stage 0": (
        _set("deepspeed", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
        ["deepspeed.zero_optimization.offload_optimizer", "stage"]),
    "deepspeed contradicts batch size": (
        _set("deepspeed", {"train_micro_batch_size_per_gpu": 8}),
        ["deepspeed.train_micro_batch_size_per_gpu", "train.micro_batch_size"]),
    "deepspeed contradicts dtype": (_set("deepspeed", {"fp16": {"enabled": True}}),
                                    ["deepspeed.fp16.enabled", "model.dtype"]),
    "unresolvable auto": (_set("deepspeed", {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}),
                          ["deepspeed.zero_optimization.sub_group_size", "auto"]),
}


@pytest.mark.parametrize("mutate,needles", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_bad_config_raises_one_line_config_error(tmp_path, mutate, needles):
    raw = valid_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, *needles)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train": {"lr": 0.1},\n  "model": {"dtype": "fp32",}\n}\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert_one_line_error(excinfo, f"{path}:3:", "invalid JSON")


def test_missing_config_file_and_non_object(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "nope.json")
    assert_one_line_error(excinfo, "nope.json", "not found")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, [1, 2]))
    assert_one_line_error(excinfo, "JSON object")


def test_invalid_deepspeed_json_names_field_and_line(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {\n"stage": 3\n')
    raw = valid_raw()
    raw["deepspeed"] = str(ds)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, "deepspeed:", f"{ds}:")
    ds.write_text("[1, 2]")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, "deepspeed", "JSON object")


def test_error_messages_escape_line_breaks(tmp_path):
    raw = valid_raw()
    raw["model"]["name_or_path"] = "no\nsuch\u2028dir"
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, "model.name_or_path")


# ------------------------------------------------------------------------------ overrides
def test_overrides(tmp_path):
    path = write(tmp_path, valid_raw())
    cfg = load_config(path, ["train.lr=0.5", 'propulsion.targets=["q_proj"]', "resume=auto",
                             "train.max_steps=null", "train.epochs=3", f"data.eval={TEXT}",
                             "propulsion.embeddings=true", "eval={\"every_steps\": 7}"])
    assert cfg.train.lr == 0.5
    assert cfg.propulsion.targets == ["q_proj"]
    assert cfg.resume == "auto"
    assert cfg.train.max_steps is None and cfg.train.epochs == 3
    assert cfg.data.eval == TEXT                         # not JSON: kept as a plain string
    assert cfg.propulsion.embeddings is True
    assert cfg.eval.every_steps == 7 and cfg.eval.max_batches == 50
    # Later overrides win; a section missing from the file is created.
    cfg = load_config(path, ["train.lr=0.5", "train.lr=0.25", "checkpoint.keep_last=5"])
    assert cfg.train.lr == 0.25 and cfg.checkpoint.keep_last == 5


def test_override_into_deepspeed_file_makes_it_inline(tmp_path):
    cfg = load_config(write(tmp_path, valid_raw()), ["deepspeed.zero_optimization.stage=2"])
    assert isinstance(cfg.deepspeed, dict)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert json.loads(Path(ZERO3).read_text())["zero_optimization"]["stage"] == 3  # file untouched
    ds = resolve_deepspeed(cfg, 1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 6


@pytest.mark.parametrize("override,needles", [
    ("train.lrr=0.5", ["unknown key 'train.lrr'", "did you mean 'train.lr'?"]),
    ("train.lr.extra=1", ["'train.lr' is a value", "extra"]),
    ("newsection.key=1", ["unknown key 'newsection'"]),
    ("train.newkey=1", ["unknown key 'train.newkey'"]),
    ("propulsion.degree.x=1", ["propulsion.degree"]),
    ("train.lr", ["KEY=VALUE"]),
    ("train..lr=1", ["KEY=VALUE"]),
    ("train.lr=fast", ["train.lr: expected a number", "'fast' (str)"]),
    ("train.max_steps=1e3", ["train.max_steps", "float"]),
    ("deepspeed.zero_optimization.stage.x=1", ["deepspeed.zero_optimization.stage", "not an object"]),
])
def test_bad_overrides(tmp_path, override, needles):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, valid_raw()), [override])
    assert_one_line_error(excinfo, *needles)


def test_apply_overrides_does_not_mutate_input():
    raw = valid_raw()
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["train.lr=0.5", "eval.every_steps=3"])
    assert raw == before
    assert out["train"]["lr"] == 0.5 and out["eval"] == {"every_steps": 3}


# ------------------------------------------------------------------------------ deepspeed
def test_resolve_deepspeed_fills_autos_for_two_ranks(tmp_path):
    raw = valid_raw()
    raw["model"]["dtype"] = "bf16"
    raw["train"]["max_grad_norm"] = 0.5
    cfg = load_config(write(tmp_path, raw))
    ds = resolve_deepspeed(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 500_000_000 and type(zero["reduce_bucket_size"]) is int
    assert zero["stage3_prefetch_bucket_size"] == 500_000_000
    assert zero["stage3_param_persistence_threshold"] == 100_000
    assert "optimizer" not in ds and "scheduler" not in ds
    assert isinstance(ds["steps_per_print"], int) and ds["steps_per_print"] >= 10**6
    assert "auto" not in json.dumps(ds)

    zero = resolve_deepspeed(cfg, 2, hidden_size=64)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640


def test_resolve_deepspeed_inline_copy_and_minimal_section(tmp_path):
    raw = valid_raw()
    raw["model"]["dtype"] = "fp16"
    raw["deepspeed"] = {"train_batch_size": "auto", "steps_per_print": 5}
    cfg = load_config(write(tmp_path, raw))
    ds = resolve_deepspeed(cfg, 4)
    assert cfg.deepspeed["train_batch_size"] == "auto"                 # the config is not modified
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["fp16"] == {"enabled": True} and "bf16" not in ds
    assert ds["steps_per_print"] == 5
    # A minimal section: DeepSpeed itself asserts without batch keys; they are filled from train.
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    ds = resolve_deepspeed(load_config(write(tmp_path, raw)), 2, hidden_size=64)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 3, 12, 1.0)
    assert ds["zero_optimization"] == {"stage": 3}                     # explicit keys only: no "auto" to fill


@pytest.mark.parametrize("section, needle", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "deepspeed.optimizer: not supported"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "deepspeed.scheduler: not supported"),
])
def test_deepspeed_optimizer_and_scheduler_sections_are_refused(tmp_path, section, needle):
    """The trainer's own AdamW and schedule would silently win over them: refuse in one line."""
    raw = valid_raw()
    raw["deepspeed"] = section
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, raw))
    assert_one_line_error(excinfo, needle)


def test_resolve_deepspeed_errors(tmp_path):
    raw = valid_raw()
    raw["deepspeed"] = {"train_batch_size": 12}
    cfg = load_config(write(tmp_path, raw))          # 2 * 3 * world 2 == 12
    assert resolve_deepspeed(cfg, 2)["train_batch_size"] == 12
    with pytest.raises(ConfigError) as excinfo:
        resolve_deepspeed(cfg, 4)
    assert_one_line_error(excinfo, "deepspeed.train_batch_size", "world_size 4")


def test_paths_in_a_config_resolve_against_its_directory(tmp_path, monkeypatch):
    """configs/llama13b.json works from any working directory; --set values stay cwd-relative."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.json", [f"output_dir={tmp_path / 'o'}"])
    assert cfg.model.name_or_path == str(REPO / "assets" / "stories260K")
    assert cfg.data.train == str(REPO / "assets" / "data" / "tinyshakespeare.txt")
    assert cfg.deepspeed == str(REPO / "configs" / "deepspeed" / "zero3.json")
    assert resolve_deepspeed(cfg, 1)["zero_optimization"]["stage"] == 3
    (tmp_path / "mine.txt").write_text("x " * 500)
    cfg = load_config(REPO / "configs" / "tiny.json", ["data.train=mine.txt"])
    assert cfg.data.train == "mine.txt"
    hub = load_config(REPO / "configs" / "tiny.json", ["model.name_or_path=HuggingFaceTB/SmolLM2-135M"],
                      check_files=False)
    assert hub.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"    # a Hub id is kept as written


# ------------------------------------------------------------------------------ property tests
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def _known_paths(node, prefix=()):
    paths = []
    for key, value in node.items():
        paths.append(prefix + (key,))
        if isinstance(value, dict):
            paths.extend(_known_paths(value, prefix + (key,)))
    return paths


def _full_raw() -> dict:
    """Every schema key, so mutations can reach all of them."""
    raw = config_to_dict(config_from_dict(valid_raw()))
    raw["deepspeed"] = json.loads(Path(ZERO3).read_text())
    return raw


FULL_PATHS = _known_paths(_full_raw())


@st.composite
def mutated_configs(draw):
    raw = _full_raw()
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(FULL_PATHS))
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if draw(st.booleans()):
            node.pop(path[-1], None)
        else:
            node[path[-1]] = draw(json_values)
    return raw


def _only_config_errors(tmp_dir: Path, raw, overrides=()):
    path = tmp_dir / "prop.json"
    path.write_text(json.dumps(raw))
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        assert str(e).splitlines() == [str(e)]
        return
    # Accepted: the DeepSpeed config must then resolve too.
    try:
        resolve_deepspeed(cfg, 2)
    except ConfigError:
        pass


PROPERTY = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(raw=json_values)
def test_random_json_only_raises_config_error(tmp_path_factory, raw):
    _only_config_errors(tmp_path_factory.getbasetemp(), raw)


@PROPERTY
@given(raw=mutated_configs())
def test_mutated_config_only_raises_config_error(tmp_path_factory, raw):
    _only_config_errors(tmp_path_factory.getbasetemp(), raw)


@PROPERTY
@given(key=st.sampled_from(["train.lr", "propulsion.targets", "data.train", "deepspeed",
                            "deepspeed.zero_optimization", "resume", "train", "x.y", "train.lr.z"]),
       value=json_values, raw_text=st.text(max_size=10), as_json=st.booleans())
def test_random_overrides_only_raise_config_error(tmp_path_factory, key, value, raw_text, as_json):
    text = json.dumps(value) if as_json else raw_text
    _only_config_errors(tmp_path_factory.getbasetemp(), valid_raw(), [f"{key}={text}"])
