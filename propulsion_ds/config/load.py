"""Load, override and validate a run config; resolve its DeepSpeed config.

``load_config(path, overrides)`` reads one JSON file, applies ``a.b=value`` overrides (the
``--set`` flag) to the raw dict, then builds :class:`~propulsion_ds.config.RunConfig` by walking
the dataclasses. Every problem is a :class:`~propulsion_ds.config.ConfigError` whose message is
one line naming the field by its dotted path, and every check runs before anything heavy loads:
types, ranges, choices, contradictions, then files on disk (model directory, data files, the
DeepSpeed JSON). Relative paths written in a config file (the DeepSpeed JSON, data files, model
and tokenizer directories, data.cache_dir) resolve against that file's directory, so a config works
from any working directory; ``--set`` values and ``output_dir`` are relative to the working
directory. ``model.name_or_path`` may also be a Hugging Face Hub id (``org/name``).

``resolve_deepspeed(cfg, world_size)`` returns the DeepSpeed config dict with each ``"auto"``
filled from the run config, as the Hugging Face DeepSpeed integration fills them.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import json
import math
import os
import typing
from typing import Any, Iterable, Union

from propulsion_ds.config import ConfigError, RunConfig
from propulsion_ds.model import HUB_ID, is_hub_id

__all__ = ["ConfigError", "load_config", "config_from_dict", "apply_overrides", "resolve_deepspeed",
           "config_to_dict", "expand_data_paths", "DATA_EXTENSIONS"]

DATA_EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet")
# Files `datasets.save_to_disk` writes: state.json for a Dataset, dataset_dict.json for a DatasetDict.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
QUIET_STEPS_PER_PRINT = 1_000_000_000
ZERO_DEFAULT_BUCKET = 500_000_000
ZERO_DEFAULT_PERSISTENCE = 100_000

CHOICES = {
    "model.dtype": ("bf16", "fp16", "fp32"),
    "data.format": ("text", "instruction", "chat"),
    "train.schedule": ("constant", "linear", "cosine"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "eval.metric": ("marker", "exact", "none"),
}

# (dotted path, operator, bound); Optional fields are checked only when set.
RANGES = [
    ("train.lr", ">", 0), ("train.weight_decay", ">=", 0), ("train.warmup_steps", ">=", 0),
    ("train.max_steps", ">=", 1), ("train.epochs", ">=", 1), ("train.micro_batch_size", ">=", 1),
    ("train.gradient_accumulation_steps", ">=", 1), ("train.max_grad_norm", ">=", 0),
    ("train.max_bad_steps", ">=", 1), ("train.seed", ">=", 0), ("train.seed", "<=", 2**32 - 1),
    ("data.max_length", ">=", 8), ("data.eval_fraction", ">=", 0), ("data.eval_fraction", "<", 1),
    ("eval.every_steps", ">=", 1), ("eval.max_batches", ">=", 1),
    ("eval.generate_samples", ">=", 1), ("eval.max_new_tokens", ">=", 1), ("data.num_proc", ">=", 1),
    ("checkpoint.every_steps", ">=", 1), ("checkpoint.keep_last", ">=", 1),
    ("logging.every_steps", ">=", 1), ("distributed.timeout_minutes", ">", 0),
]
_OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}

_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})
_MISSING = object()


# --------------------------------------------------------------------------- helpers
def _fail(msg: str) -> typing.NoReturn:
    raise ConfigError(msg.translate(_LINE_BREAKS))


def _show(value: Any, limit: int = 80) -> str:
    """repr() of a user value, short and on one line (repr escapes line breaks)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):       # an int past Python's str-digits limit, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _got(value: Any) -> str:
    return f"got {_show(value)} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _all_paths(cls=RunConfig, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(cls)
    for name in _field_names(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            paths.extend(_all_paths(tp, f"{prefix}{name}."))
        else:
            paths.append(prefix + name)
    return paths


def _unknown_key(prefix: str, key: str, known: list[str]) -> str:
    full = prefix + key
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key {full!r} (did you mean {prefix + close[0]!r}?)"
    # A key put in the wrong section: 'lr' at the top level means 'train.lr'.
    leaves = {p: p.rsplit(".", 1)[-1] for p in _all_paths()}
    close = difflib.get_close_matches(key, list(set(leaves.values())), n=1, cutoff=0.8)
    if close:
        where = [p for p, leaf in leaves.items() if leaf == close[0]]
        return f"unknown key {full!r} (did you mean {' or '.join(repr(p) for p in where)}?)"
    return f"unknown key {full!r} (known keys here: {', '.join(known)})"


# --------------------------------------------------------------------------- types
def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        parts = [_describe(a) for a in typing.get_args(tp)]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    base = origin or tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(
        base, "an object" if dataclasses.is_dataclass(tp) else getattr(tp, "__name__", str(tp)))


_NO_MATCH = object()


def _match(value: Any, tp, path: str) -> Any:
    """``value`` converted to ``tp`` (int -> float only), or _NO_MATCH."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        # Exact types first, so Union[int, float] keeps an int an int.
        for arg in sorted(args, key=lambda a: a is float):
            got = _match(value, arg, path)
            if got is not _NO_MATCH:
                return got
        return _NO_MATCH
    if tp is type(None):
        return value if value is None else _NO_MATCH
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if _is_int(value) else _NO_MATCH
    if tp is float:
        if not _is_number(value):
            return _NO_MATCH
        try:
            number = float(value)
        except OverflowError:
            _fail(f"{path}: {_show(value)} is too large for a number")
        if not math.isfinite(number):
            _fail(f"{path}: expected a finite number, {_got(value)}")
        return number
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    if (origin or tp) is list:
        if not isinstance(value, list):
            return _NO_MATCH
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if (origin or tp) is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    raise TypeError(f"config schema: unsupported annotation {tp!r} at {path}")


def _check_type(value: Any, tp, path: str) -> Any:
    got = _match(value, tp, path)
    if got is _NO_MATCH:
        _fail(f"{path}: expected {_describe(tp)}, {_got(value)}")
    return got


def _build(cls, raw: Any, prefix: str):
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        _fail(f"{section or 'config'}: expected an object, {_got(raw)}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    for key in raw:
        if key not in names:
            _fail(_unknown_key(prefix, str(key), names))
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(raw[name], tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:       # a section's own __post_init__ (PropulsionConfig)
        msg = str(e)
        if section and not msg.startswith(section):
            first = msg.replace(":", " ").split(" ", 1)[0]
            msg = f"{section}.{msg}" if first in names else f"{section}: {msg}"
        _fail(msg)


# --------------------------------------------------------------------------- JSON files
def _read_json(path: Any, field: str | None) -> Any:
    """Parse a JSON file; errors name ``field`` (or the file, for the run config itself)."""
    what = f"{field}: " if field else ""
    kind = "file" if field else "config file"
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        _fail(f"{what}expected a path to a JSON file, {_got(path)}")
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        _fail(f"{what}{kind} not found: {shown!r}")
    except IsADirectoryError:
        _fail(f"{what}{kind} {shown!r} is a directory, expected a JSON file")
    except UnicodeDecodeError as e:
        _fail(f"{what}{kind} {shown!r} is not UTF-8 text (byte {e.start})")
    except (OSError, ValueError) as e:          # permissions, name too long, embedded NUL
        _fail(f"{what}cannot read {kind} {shown!r}: {getattr(e, 'strerror', None) or e}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"{what}{shown}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")
    except (ValueError, RecursionError) as e:   # a number past the int-digits limit, deep nesting
        _fail(f"{what}{shown}: invalid JSON: {type(e).__name__}: {e}")


def _load_deepspeed(value: Any) -> dict:
    """The DeepSpeed config dict named by ``deepspeed`` (a JSON path or an inline dict), copied."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    ds = _read_json(value, "deepspeed")
    if not isinstance(ds, dict):
        _fail(f"deepspeed: {value!r} must hold a JSON object, {_got(ds)}")
    return ds


# --------------------------------------------------------------------------- overrides
def _parse_override(item: Any) -> tuple[list[str], Any]:
    if not isinstance(item, str):
        _fail(f"override {_show(item)}: expected a string KEY=VALUE")
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        _fail(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=1e-3")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = text                            # not JSON: a plain string (paths, 'auto', names)
    return parts, value


def apply_overrides(raw: dict, overrides: Iterable[str] = ()) -> dict:
    """A copy of ``raw`` with each ``a.b=value`` applied; the value is JSON if it parses.

    The path must name a schema field (a section or a value). Inside the free-form
    ``deepspeed`` object any key may be set (``deepspeed.zero_optimization.stage=2``); when
    ``deepspeed`` is a file path, the file is read and the override makes it inline.
    """
    if not isinstance(raw, dict):
        _fail(f"config: expected an object, {_got(raw)}")
    if isinstance(overrides, (str, bytes)):
        overrides = [overrides]
    raw = copy.deepcopy(raw)
    defaults = {f.name: f for f in dataclasses.fields(RunConfig)}
    for item in overrides:
        parts, value = _parse_override(item)
        cls, node = RunConfig, raw
        for i, name in enumerate(parts):
            prefix = "".join(p + "." for p in parts[:i])
            dotted = prefix + name
            names = _field_names(cls)
            if name not in names:
                _fail(f"override {item!r}: {_unknown_key(prefix, name, names)}")
            if i == len(parts) - 1:
                node[name] = value
                break
            tp = typing.get_type_hints(cls)[name]
            if dataclasses.is_dataclass(tp):
                child = node.setdefault(name, {})
                if not isinstance(child, dict):
                    _fail(f"{dotted}: expected an object, {_got(child)}")
                cls, node = tp, child
                continue
            if cls is RunConfig and name == "deepspeed":
                current = node.get(name, _MISSING)
                if current is _MISSING:
                    current = defaults[name].default
                node[name] = ds = _load_deepspeed(current)
                for j, key in enumerate(parts[i + 1:-1], start=i + 1):
                    ds = ds.setdefault(key, {})
                    if not isinstance(ds, dict):
                        _fail(f"override {item!r}: {'.'.join(parts[:j + 1])} is {_show(ds)}, "
                              f"not an object")
                ds[parts[-1]] = value
                break
            _fail(f"override {item!r}: {dotted!r} is a value, not a section; "
                  f"no key {'.'.join(parts[i + 1:])!r} under it")
    return raw


# --------------------------------------------------------------------------- checks
def _get(cfg: RunConfig, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_values(cfg: RunConfig) -> None:
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            _fail(f"{dotted}: expected one of {', '.join(choices)}, got {_show(value)}")
    if isinstance(cfg.resume, str) and cfg.resume != "auto":
        _fail(f"resume: expected false, true or \"auto\", got {_show(cfg.resume)}")
    for dotted, op, bound in RANGES:
        value = _get(cfg, dotted)
        if value is not None and not _OPS[op](value, bound):
            _fail(f"{dotted}: must be {op} {bound}, got {_show(value)}")
    for dotted in ("data.text_field", "output_dir"):
        if not _get(cfg, dotted):
            _fail(f"{dotted}: must not be empty")
    if cfg.tokenizer.name_or_path == "":
        _fail("tokenizer.name_or_path: must not be empty (use null for the model's tokenizer)")
    if cfg.data.template is not None and not cfg.data.template.strip():
        _fail("data.template: must not be empty (use null for the default template)")

    t = cfg.train
    if t.max_steps is not None and t.epochs is not None:
        _fail("train: set max_steps or epochs, not both "
              f"(train.max_steps={t.max_steps}, train.epochs={t.epochs})")
    if t.max_steps is None and t.epochs is None:
        _fail("train: set one of them, max_steps or epochs (neither train.max_steps nor "
              "train.epochs is set)")
    for field in ("train", "eval"):
        spec = getattr(cfg.data, field)
        if spec is None:
            continue
        if spec == "" or spec == []:
            _fail(f"data.{field}: must be set (a file, glob or directory, or a list of them)"
                  if field == "train" else "data.eval: must not be empty (use null for no eval set)")
        for i, entry in enumerate(spec if isinstance(spec, list) else [spec]):
            where = f"data.{field}[{i}]" if isinstance(spec, list) else f"data.{field}"
            if not isinstance(entry, str) or not entry:
                _fail(f"{where}: expected a non-empty path string, {_got(entry)}")
    if cfg.data.eval is not None and cfg.data.eval_fraction > 0:
        _fail(f"data: set eval or eval_fraction, not both "
              f"(data.eval_fraction={cfg.data.eval_fraction})")


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS)


def _data_file_ok(field: str, path: str, fmt: str | None) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_EXTENSIONS:
        _fail(f"{field}: unsupported file type {path!r} (expected {', '.join(DATA_EXTENSIONS)} "
              f"or a saved datasets directory)")
    if fmt is not None and fmt != "text" and ext == ".txt":
        _fail(f"{field}: {path!r} is plain text but data.format is {fmt!r}, which needs records "
              f"(.jsonl, .json, .parquet or a saved datasets directory)")


def expand_data_paths(spec: Union[str, list], field: str = "data.train",
                      fmt: str | None = None) -> list[str]:
    """The files (or saved ``datasets`` directories) that ``data.train``/``data.eval`` name.

    Each entry is a file, a glob (``**`` recurses; must match at least one file) or a directory:
    a ``save_to_disk`` directory is kept as one entry, any other directory contributes its data
    files (not recursive, hidden files skipped). Order: entries as given, each expanded sorted.
    Raises ConfigError naming ``field`` (with ``[i]`` for list entries) and the path.
    """
    entries = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]" if isinstance(spec, list) else field
        if not isinstance(entry, str) or not entry:
            _fail(f"{where}: expected a non-empty path string, {_got(entry)}")
        try:
            if glob.has_magic(entry):
                matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
                if not matches:
                    _fail(f"{where}: glob {entry!r} matches no files")
                for p in matches:
                    _data_file_ok(where, p, fmt)
                out.extend(matches)
            elif os.path.isdir(entry):
                if _is_saved_dataset(entry):
                    out.append(entry)
                    continue
                files = sorted(
                    os.path.join(entry, n) for n in os.listdir(entry)
                    if not n.startswith(".") and os.path.splitext(n)[1].lower() in DATA_EXTENSIONS
                    and os.path.isfile(os.path.join(entry, n)))
                if not files:
                    _fail(f"{where}: directory {entry!r} is neither a saved datasets directory nor "
                          f"holds data files ({', '.join(DATA_EXTENSIONS)})")
                for p in files:
                    _data_file_ok(where, p, fmt)
                out.extend(files)
            elif os.path.isfile(entry):
                _data_file_ok(where, entry, fmt)
                out.append(entry)
            else:
                _fail(f"{where}: file not found: {entry!r}")
        except (OSError, ValueError) as e:     # ConfigError is a ValueError: pass it through
            if isinstance(e, ConfigError):
                raise
            _fail(f"{where}: cannot read {entry!r}: {getattr(e, 'strerror', None) or e}")
    return out


def _isdir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):
        return False


def _check_files(cfg: RunConfig) -> None:
    model = cfg.model.name_or_path
    if not _isdir(model) and not is_hub_id(model):
        _fail(f"model.name_or_path: directory not found: {model!r} (a local model directory, "
              f"relative to the config file's directory, or a Hugging Face Hub id org/name)")
    if _isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        _fail(f"model.name_or_path: {model!r} has no config.json, not a transformers model directory")
    tok = cfg.tokenizer.name_or_path
    if tok is not None and not _isdir(tok) and not is_hub_id(tok):
        _fail(f"tokenizer.name_or_path: directory not found: {tok!r}")
    expand_data_paths(cfg.data.train, "data.train", cfg.data.format)
    if cfg.data.eval is not None:
        expand_data_paths(cfg.data.eval, "data.eval", cfg.data.format)
    try:
        out_is_file = os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir)
    except (OSError, ValueError):
        out_is_file = False
    if out_is_file:
        _fail(f"output_dir: {cfg.output_dir!r} exists and is not a directory")


def _check_deepspeed(ds: dict) -> None:
    """Structure and ZeRO contradictions of a DeepSpeed config dict."""
    zero = ds.get("zero_optimization", {})
    if zero is None:
        zero = {}
    if not isinstance(zero, dict):
        _fail(f"deepspeed.zero_optimization: expected an object, {_got(zero)}")
    stage = zero.get("stage", 0)
    if not _is_int(stage) or stage not in (0, 1, 2, 3):
        _fail(f"deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got {_show(stage)}")
    for what, stages, need in (("offload_param", (3,), "stage 3"),
                               ("offload_optimizer", (1, 2, 3), "stage 1, 2 or 3")):
        off = zero.get(what)
        if off is None:
            continue
        path = f"deepspeed.zero_optimization.{what}"
        if not isinstance(off, dict):
            _fail(f"{path}: expected an object, {_got(off)}")
        device = off.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            _fail(f"{path}.device: expected one of none, cpu, nvme, got {_show(device)}")
        if device != "none" and stage not in stages:
            _fail(f"{path}: offloading to {device} needs ZeRO {need}, "
                  f"but deepspeed.zero_optimization.stage is {stage}")
        if device == "nvme" and not off.get("nvme_path"):
            _fail(f"{path}.nvme_path: required when {path}.device is 'nvme'")
    for key in ("bf16", "bfloat16", "fp16"):
        if key in ds and not isinstance(ds[key], dict):
            _fail(f"deepspeed.{key}: expected an object, {_got(ds[key])}")
    # The trainer builds AdamW and the LR schedule itself (train.lr, weight_decay, warmup_steps,
    # schedule): that is what lets it veto a non-finite update on every rank and log the LR each
    # update used. A DeepSpeed section would silently compete with them.
    if "optimizer" in ds:
        _fail("deepspeed.optimizer: not supported, the trainer builds AdamW from train.lr and "
              "train.weight_decay; remove the section")
    if "scheduler" in ds:
        _fail("deepspeed.scheduler: not supported, the LR schedule comes from train.schedule and "
              "train.warmup_steps; remove the section")


# --------------------------------------------------------------------------- public API
def config_from_dict(raw: Any, overrides: Iterable[str] = (), *, check_files: bool = True) -> RunConfig:
    """Validate a raw config dict (as read from JSON) into a RunConfig; see :func:`load_config`."""
    try:
        return _from_dict(raw, overrides or (), check_files)
    except RecursionError:
        _fail("config: nested too deeply")


def _from_dict(raw: Any, overrides: Iterable[str], check_files: bool) -> RunConfig:
    raw = apply_overrides(raw, overrides)
    cfg = _build(RunConfig, raw, "")
    _check_values(cfg)
    if check_files:
        _check_files(cfg)
    ds = _load_deepspeed(cfg.deepspeed) if check_files or isinstance(cfg.deepspeed, dict) else None
    if ds is not None:
        # A dry run: explicit values that contradict the run config, and any "auto" left
        # unfilled, fail now rather than after the model has loaded.
        _resolve(cfg, ds, None, None, cfg.train.max_steps or 1)
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                check_files: bool = True) -> RunConfig:
    """Read the run config at ``path``, apply ``overrides`` ("a.b=value"), validate everything.

    Raises ConfigError (one line, naming the field's dotted path, or the file and line:col for
    bad JSON). ``check_files=False`` skips the checks of paths on disk (for tools that only read
    the schema); the inline-DeepSpeed checks still run.
    """
    raw = _read_json(path, None)
    if not isinstance(raw, dict):
        _fail(f"{os.fspath(path)}: expected a JSON object at the top level, {_got(raw)}")
    raw = anchor_paths(raw, os.path.dirname(os.path.abspath(os.fspath(path))))
    return config_from_dict(raw, overrides, check_files=check_files)


def _anchor(value: Any, base: str) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base, value))
    return value


def anchor_paths(raw: dict, base: str) -> dict:
    """A copy of a raw config with its relative paths resolved against ``base`` (its file's dir).

    ``model.name_or_path`` / ``tokenizer.name_or_path`` stay as written when they look like a Hub
    id (``org/name``) and no such directory exists under ``base``. ``output_dir`` is not touched.
    """
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = _anchor(raw["deepspeed"], base)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval", "cache_dir"):
            value = data.get(key)
            if key in data:
                data[key] = [_anchor(v, base) for v in value] if isinstance(value, list) else _anchor(value, base)
    for section in ("model", "tokenizer"):
        node = raw.get(section)
        value = node.get("name_or_path") if isinstance(node, dict) else None
        if isinstance(value, str) and value:
            anchored = _anchor(value, base)
            if os.path.isdir(anchored) or not HUB_ID.match(value):
                node["name_or_path"] = anchored
    return raw





def config_to_dict(cfg: RunConfig) -> dict:
    """Plain-JSON form of ``cfg`` (what ``load_config`` reads back to an equal config)."""
    return dataclasses.asdict(cfg)


def _fill(container: dict, key: str, value: Any, path: str, run_field: str | None,
          missing: bool = False) -> None:
    """Fill an "auto" (and, with ``missing``, an absent key); an explicit value must agree with
    the run config's (``run_field``)."""
    if key not in container:
        if missing:
            container[key] = value
        return
    current = container[key]
    if current == "auto":
        container[key] = value
    elif run_field is not None and current != value:
        _fail(f"{path}: is {_show(current)} but {run_field} gives {_show(value)}; "
              f"set it to \"auto\" or make the two agree")


def _resolve(cfg: RunConfig, ds: dict, world_size: int | None, hidden_size: int | None,
             total_steps: int | None) -> dict:
    _check_deepspeed(ds)
    t = cfg.train
    micro, accum = t.micro_batch_size, t.gradient_accumulation_steps
    # Absent batch keys are filled like "auto": DeepSpeed would otherwise assert on a minimal
    # {"zero_optimization": {"stage": 3}} section.
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "deepspeed.train_micro_batch_size_per_gpu",
          "train.micro_batch_size", missing=True)
    _fill(ds, "gradient_accumulation_steps", accum, "deepspeed.gradient_accumulation_steps",
          "train.gradient_accumulation_steps", missing=True)
    _fill(ds, "train_batch_size", micro * accum * (world_size or 1), "deepspeed.train_batch_size",
          None if world_size is None else
          f"train.micro_batch_size * train.gradient_accumulation_steps * world_size {world_size}",
          missing=world_size is not None)
    _fill(ds, "gradient_clipping", t.max_grad_norm, "deepspeed.gradient_clipping", "train.max_grad_norm",
          missing=True)

    dtype = cfg.model.dtype
    for key, alias in (("bf16", "bfloat16"), ("fp16", None)):
        want = dtype == key
        name = key if key in ds or alias not in ds else alias
        section = ds.get(name)
        if section is None:
            if want:
                ds[name] = {"enabled": True}
            continue
        enabled = section.setdefault("enabled", False)
        if enabled == "auto":
            section["enabled"] = want
        elif enabled is not want:
            _fail(f"deepspeed.{name}.enabled: is {_show(enabled)} but model.dtype is {dtype!r}; "
                  f"set it to \"auto\" or make the two agree")
    if ds.get("bf16", ds.get("bfloat16", {})).get("enabled") is True and \
            ds.get("fp16", {}).get("enabled") is True:
        _fail("deepspeed: bf16.enabled and fp16.enabled are both true")

    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        h = hidden_size
        for key, value in (
                ("reduce_bucket_size", h * h if h else ZERO_DEFAULT_BUCKET),
                ("stage3_prefetch_bucket_size", int(0.9 * h * h) if h else ZERO_DEFAULT_BUCKET),
                ("stage3_param_persistence_threshold", 10 * h if h else ZERO_DEFAULT_PERSISTENCE)):
            _fill(zero, key, value, f"deepspeed.zero_optimization.{key}", None)

    ds.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    _no_auto_left(ds, "deepspeed")
    return ds


def _no_auto_left(node: Any, path: str) -> None:
    if node == "auto" and isinstance(node, str):
        _fail(f"{path}: \"auto\" has no value to take from the run config; set it explicitly")
    if isinstance(node, dict):
        for key, value in node.items():
            _no_auto_left(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _no_auto_left(value, f"{path}[{i}]")


def resolve_deepspeed(cfg: RunConfig, world_size: int, hidden_size: int | None = None, *,
                      total_steps: int | None = None) -> dict:
    """The DeepSpeed config for this run: loaded (file or inline), deep-copied, autos filled.

    Fills as the Hugging Face integration does: micro batch, accumulation, train_batch_size
    (micro * accum * world_size), gradient_clipping (absent keys too), bf16/fp16.enabled from
    model.dtype (a missing bf16/fp16 section is added when the dtype needs it), and ZeRO bucket
    sizes from ``hidden_size`` (h*h, 0.9*h*h, 10*h, as the memory planner assumes) or fixed
    defaults. Explicit values that contradict the run config, any "auto" left over, and an
    ``optimizer`` or ``scheduler`` section raise ConfigError. Adds a quiet ``steps_per_print``.
    ``total_steps`` is accepted for callers that know the run length; nothing needs it now.
    """
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if hidden_size is not None and (not _is_int(hidden_size) or hidden_size < 1):
        raise ValueError(f"hidden_size must be an integer >= 1 or None, got {hidden_size!r}")
    return _resolve(cfg, _load_deepspeed(cfg.deepspeed), world_size, hidden_size,
                    cfg.train.max_steps or total_steps)
