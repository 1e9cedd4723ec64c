"""Load a run config: read one JSON file, apply ``--set a.b=value`` overrides, validate it all.

``load_config(path, overrides)`` reads the file, anchors its relative paths to the file's
directory (``config/paths.py``), applies the overrides to the raw dict, builds
:class:`~propulsion_ds.config.RunConfig` (``config/build.py``) and checks it
(``config/validate.py``, ``config/deepspeed.py``). Every problem is a
:class:`~propulsion_ds.errors.ConfigError` whose message is one line naming the field by its
dotted path, and every check runs before anything heavy loads. ``model.name_or_path`` may also
be a Hugging Face Hub id (``org/name``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import typing
from typing import Any, Iterable

from propulsion_ds.config.build import build, unknown_key
from propulsion_ds.config.deepspeed import fill_deepspeed, load_deepspeed
from propulsion_ds.config.jsonfile import read_json
from propulsion_ds.config.messages import fail, got, show
from propulsion_ds.config.paths import anchor_paths
from propulsion_ds.config.schema import RunConfig, field_names
from propulsion_ds.config.validate import check_contradictions, check_declared, check_files

__all__ = ["load_config", "config_from_dict", "apply_overrides", "config_to_dict"]


def _parse_override(item: Any) -> tuple[list[str], Any]:
    if not isinstance(item, str):
        fail(f"override {show(item)}: expected a string KEY=VALUE")
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        fail(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=1e-3")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = text                            # not JSON: a plain string (paths, 'auto', names)
    return parts, value


def _set_in_deepspeed(raw: dict, parts: list[str], value: Any, item: str) -> None:
    """``deepspeed.a.b=value``: the DeepSpeed config (read from its file if it is one) made
    inline, with any key set; it is free-form, so nothing is checked against the schema."""
    current = raw.get("deepspeed", RunConfig.__dataclass_fields__["deepspeed"].default)
    raw["deepspeed"] = ds = load_deepspeed(current)
    for j, key in enumerate(parts[1:-1], start=1):
        ds = ds.setdefault(key, {})
        if not isinstance(ds, dict):
            fail(f"override {item!r}: {'.'.join(parts[:j + 1])} is {show(ds)}, not an object")
    ds[parts[-1]] = value


def _apply_one(raw: dict, item: Any) -> None:
    parts, value = _parse_override(item)
    cls, node = RunConfig, raw
    for i, name in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        names = field_names(cls)
        if name not in names:
            fail(f"override {item!r}: {unknown_key(prefix, name, names)}")
        if i == len(parts) - 1:
            node[name] = value
            return
        tp = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(tp):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                fail(f"{prefix + name}: expected an object, {got(child)}")
            cls, node = tp, child
        elif cls is RunConfig and name == "deepspeed":
            _set_in_deepspeed(node, parts, value, item)
            return
        else:
            fail(f"override {item!r}: {prefix + name!r} is a value, not a section; "
                 f"no key {'.'.join(parts[i + 1:])!r} under it")


def apply_overrides(raw: dict, overrides: Iterable[str] = ()) -> dict:
    """A copy of ``raw`` with each ``a.b=value`` applied; the value is JSON if it parses.

    The path must name a schema field (a section or a value). Inside the free-form
    ``deepspeed`` object any key may be set (``deepspeed.zero_optimization.stage=2``); when
    ``deepspeed`` is a file path, the file is read and the override makes it inline.
    """
    if not isinstance(raw, dict):
        fail(f"config: expected an object, {got(raw)}")
    if isinstance(overrides, (str, bytes)):
        overrides = [overrides]
    before, raw = raw, copy.deepcopy(raw)
    overrides = list(overrides)
    for item in overrides:
        _apply_one(raw, item)
    _max_steps_replaces_epochs(before, raw, overrides)
    return raw


def _max_steps_replaces_epochs(before: dict, after: dict, overrides: list) -> None:
    """``--set train.max_steps=N`` on a config file that sets ``train.epochs`` (the shipped
    cluster configs do): the override wins and ``epochs`` is dropped, with a log line. Both set in
    the file, or both by overrides, stay a contradiction (check_contradictions refuses them)."""
    old, new = before.get("train"), after.get("train")
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return
    keys = {str(item).partition("=")[0].strip() for item in overrides}
    if ("train.max_steps" in keys and "train.epochs" not in keys and new.get("max_steps") is not None
            and old.get("max_steps") is None and new.get("epochs") is not None):
        logging.getLogger(__name__).info(
            "train.max_steps=%s (--set) replaces the config file's train.epochs=%s",
            show(new["max_steps"]), show(new["epochs"]))
        new["epochs"] = None


def _from_dict(raw: Any, overrides: Iterable[str], files: bool) -> RunConfig:
    cfg = build(apply_overrides(raw, overrides))
    check_declared(cfg)
    check_contradictions(cfg)
    if files:
        check_files(cfg)
    if files or isinstance(cfg.deepspeed, dict):
        # A dry run: explicit values that contradict the run config, and any "auto" left
        # unfilled, fail now rather than after the model has loaded.
        fill_deepspeed(cfg, load_deepspeed(cfg.deepspeed), None, None)
    return cfg


def config_from_dict(raw: Any, overrides: Iterable[str] = (), *, check_files: bool = True) -> RunConfig:
    """Validate a raw config dict (as read from JSON) into a RunConfig; see :func:`load_config`."""
    try:
        return _from_dict(raw, overrides or (), check_files)
    except RecursionError:
        fail("config: nested too deeply")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                check_files: bool = True) -> RunConfig:
    """Read the run config at ``path``, apply ``overrides`` ("a.b=value"), validate everything.

    Raises ConfigError (one line, naming the field's dotted path, or the file and line:col for
    bad JSON). ``check_files=False`` skips the checks of paths on disk (for tools that only read
    the schema); the inline-DeepSpeed checks still run.
    """
    raw = read_json(path, None)
    if not isinstance(raw, dict):
        fail(f"{os.fspath(path)}: expected a JSON object at the top level, {got(raw)}")
    raw = anchor_paths(raw, os.path.dirname(os.path.abspath(os.fspath(path))))
    return config_from_dict(raw, overrides, check_files=check_files)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain-JSON form of ``cfg`` (what ``load_config`` reads back to an equal config)."""
    return dataclasses.asdict(cfg)
