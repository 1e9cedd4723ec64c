"""Config validation and data loading expand a data spec with one function, so they agree:
what validates is what loads, and what the loader refuses is refused at validation already."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import MODEL_DIR, ROOT as REPO, write_config
from propulsion_ds.config import ConfigError
from propulsion_ds.config.paths import expand_data_paths
from propulsion_ds.config.load import load_config
from propulsion_ds.errors import DataError
from propulsion_ds.data.files import load_raw, resolve_files


def _rows(path: Path, *texts: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _config(tmp_path: Path, train) -> Path:
    raw = {"model": {"name_or_path": str(MODEL_DIR)},
           "data": {"train": train, "max_length": 64}, "train": {"max_steps": 1},
           "output_dir": str(tmp_path / "out"), "deepspeed": str(REPO / "configs/deepspeed/zero3.json")}
    return write_config(tmp_path / "run.json", raw)


def test_nested_directory_is_validated_and_loaded_alike(tmp_path):
    d = tmp_path / "data"
    top = _rows(d / "a.jsonl", "one", "two")
    deep = _rows(d / "sub" / "deeper" / "b.jsonl", "three")
    _rows(d / ".hidden" / "c.jsonl", "never")          # hidden: skipped by both
    (d / "sub" / "notes.md").write_text("not data")
    cfg = load_config(_config(tmp_path, str(d)))
    assert expand_data_paths(cfg.data.train) == resolve_files(cfg.data.train) == [top, deep]
    rows = load_raw(cfg.data.train, cache_dir=str(tmp_path / "hf"))
    assert sorted(rows["text"]) == ["one", "three", "two"]


def test_mixed_file_types_in_a_nested_directory_are_refused_by_both(tmp_path):
    d = tmp_path / "data"
    _rows(d / "a.jsonl", "one")
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("plain text\n")
    with pytest.raises(ConfigError, match=r"^data\.train: mixes file types \(json, text\)"):
        load_config(_config(tmp_path, str(d)))
    with pytest.raises(DataError, match="mixes file types"):
        load_raw(str(d), cache_dir=str(tmp_path / "hf"))


def test_saved_dataset_beside_other_entries_is_refused_by_both(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    other = _rows(tmp_path / "x.jsonl", "one")
    with pytest.raises(ConfigError, match=r"^data\.train\[0\]: .*saved datasets directory, which must be the only"):
        load_config(_config(tmp_path, [str(saved), other]))
    with pytest.raises(DataError, match="must be the only entry"):
        resolve_files([str(saved), other])


def test_duplicates_are_kept_for_validation_and_dropped_for_loading(tmp_path):
    a = _rows(tmp_path / "a.jsonl", "one")
    spec = [a, str(tmp_path / "*.jsonl")]
    load_config(_config(tmp_path, spec))
    assert expand_data_paths(spec) == [a, a]          # the resume fingerprint lists entries as written
    assert resolve_files(spec) == [a]
