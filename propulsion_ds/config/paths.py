"""Paths in a run config: relative ones resolve against the config file's directory, and the
data specs expand to files exactly as the data loader expands them (one expander, two callers).

Anchoring to the file's directory is what lets ``configs/llama13b.json`` work from any working
directory; ``--set`` values and ``output_dir`` stay relative to the working directory.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Union

from propulsion_ds.config.messages import fail, got
from propulsion_ds.errors import DataError
from propulsion_ds.model import HUB_ID


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
            # models/x where models/ is beside the config: a local path, even though x is missing.
            if os.path.isdir(anchored) or not HUB_ID.match(value) or os.path.isdir(os.path.dirname(anchored)):
                node["name_or_path"] = anchored
    return raw


def check_data_entries(spec: Any, field: str) -> list:
    """The entries of a data spec, each a non-empty string (else a ConfigError naming it)."""
    entries = spec if isinstance(spec, list) else [spec]
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry:
            where = f"{field}[{i}]" if isinstance(spec, list) else field
            fail(f"{where}: expected a non-empty path string, {got(entry)}")
    return entries


def expand_data_paths(spec: Union[str, list], field: str = "data.train",
                      fmt: str | None = None) -> list[str]:
    """The files (or the one saved ``datasets`` directory) that ``data.train``/``data.eval`` name,
    as :func:`propulsion_ds.data.files.expand_spec` expands them for loading (duplicates kept).

    With ``fmt``, plain-text files are refused unless the format is ``text``. Raises ConfigError
    naming ``field`` (with ``[i]`` for list entries) and the path.
    """
    # Imported here: the data package pulls in `datasets`, which tools reading a config with
    # check_files=False (the memory planner, the exports) never need.
    from propulsion_ds.data.files import expand_spec

    check_data_entries(spec, field)
    try:
        files = expand_spec(spec, field)
    except DataError as e:
        fail(str(e))
    if fmt is not None and fmt != "text":
        for path in files:
            if path.lower().endswith(".txt"):
                fail(f"{field}: {path!r} is plain text but data.format is {fmt!r}, which needs records "
                     f"(.jsonl, .json, .parquet or a saved datasets directory)")
    return files
