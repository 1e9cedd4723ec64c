"""Data files: resolve a ``data.train``/``data.eval`` spec into files and load them as one raw
``datasets.Dataset`` (local files only). JSONL is checked line by line first, so a malformed line is
reported as ``file:line`` instead of an arrow traceback; ``.txt`` files give one document per
blank-line-separated paragraph, in a field named ``text``."""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Optional, Sequence, Union

import datasets
from propulsion_ds.errors import DataError

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet")
_EXTS = ", ".join(SUPPORTED_EXTENSIONS)
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
# Files `datasets.save_to_disk` writes: state.json for a Dataset, dataset_dict.json for a DatasetDict.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

Spec = Union[str, Sequence[str]]


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS)


def _ext(path: str) -> str:
    low = path.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return os.path.splitext(low)[1]


def _as_list(spec: Spec) -> list[str]:
    if isinstance(spec, str):
        items = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        items = list(spec)
    else:
        raise DataError(f"data spec must be a path string or a list of them, got {spec!r}")
    if not items or any(not s.strip() for s in items):
        raise DataError(f"data spec {spec!r} is empty; set data.train to a file, glob or directory")
    return items


def describe(spec: Spec) -> str:
    """A short human name for a spec, used in error messages."""
    items = [spec] if isinstance(spec, str) else list(spec)
    return items[0] if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)"


def _problem(where: Optional[str], path: str, as_field: str, as_file: str) -> DataError:
    """Validation (``where`` = the config field) leads with the field the user edits; loading
    leads with the file. Both wordings are pinned by tests (the CLI's and the data layer's)."""
    return DataError(f"{where}: {as_field}" if where else f"{path}: {as_file}")


def _expand_entry(item: str, where: Optional[str]) -> list[str]:
    if glob.has_magic(item):
        found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise _problem(where, item, f"glob {item!r} matches no files", "glob matches no files")
        return found
    if os.path.isdir(item):
        found = sorted(
            p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
            if os.path.isfile(p) and _ext(p) in SUPPORTED_EXTENSIONS
            and not any(part.startswith(".") for part in os.path.relpath(p, item).split(os.sep)))
        if not found:
            raise _problem(where, item, f"directory {item!r} is neither a saved datasets directory nor "
                           f"holds data files ({_EXTS})", f"directory holds no data files ({_EXTS})")
        return found
    if os.path.isfile(item):
        return [item]
    raise _problem(where, item, f"file not found: {item!r}", "no such file or directory")


def expand_spec(spec: Spec, field: Optional[str] = None) -> list[str]:
    """The data files a spec names, in order, duplicates kept; the one expander that config
    validation (with ``field``, e.g. ``"data.train"``) and loading (:func:`resolve_files`) share.

    Each entry is a file, a glob (``**`` recurses; must match at least one file) or a directory:
    a ``save_to_disk`` directory must be the only entry and stands for itself, any other
    directory contributes the supported files under it (recursively, hidden files and
    directories skipped). Each entry's files are sorted, so the list is the same on every rank
    and every run. All files must be of one kind (the ``json``, ``text`` or ``parquet``
    builder). Raises DataError; with ``field`` the message names it (``field[i]`` for a list
    entry) before the path.
    """
    items = _as_list(spec)
    out: list[str] = []
    for i, item in enumerate(items):
        where = None if field is None else f"{field}[{i}]" if not isinstance(spec, str) else field
        try:
            if _is_saved_dataset(item):
                if len(items) != 1:
                    raise _problem(where, item, f"{item!r} is a saved datasets directory, which must be the "
                                   "only entry", "a saved datasets directory must be the only entry in the data spec")
                return [item]
            files = _expand_entry(item, where)
        except DataError:
            raise
        except (OSError, ValueError) as e:      # permissions, a NUL byte in a glob
            why = getattr(e, "strerror", None) or e
            raise _problem(where, item, f"cannot read {item!r}: {why}", f"cannot read: {why}") from None
        for f in files:
            if _ext(f) not in SUPPORTED_EXTENSIONS:
                raise _problem(where, f, f"unsupported file type {f!r} (expected {_EXTS} or a saved "
                               "datasets directory)", f"unsupported file type (use {_EXTS})")
        out.extend(files)
    builders = sorted({_BUILDERS[_ext(f)] for f in out})
    if len(builders) > 1:
        raise _problem(field, describe(spec), f"mixes file types ({', '.join(builders)}); use one kind per data set",
                       f"mixes file types ({', '.join(builders)}); use one kind per data set")
    return out


def resolve_files(spec: Spec) -> list[str]:
    """The data files a spec names, de-duplicated (see :func:`expand_spec`); a saved datasets
    directory resolves to ``[that directory]``."""
    return list(dict.fromkeys(expand_spec(spec)))


def _check_jsonl(path: str) -> bool:
    """Raise DataError on the first malformed line; return whether the file has any row."""
    rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows += 1
    return rows > 0


def _check_json(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        # the json builder also accepts JSON Lines in a .json file
        return _check_jsonl(path)
    return True


def _has_rows(path: str) -> bool:
    """Validate a file before loading it; False when it holds no rows at all."""
    ext = _ext(path)
    try:
        if ext == ".jsonl":
            return _check_jsonl(path)
        if ext == ".json":
            return _check_json(path)
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                return any(line.strip() for line in f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return os.path.getsize(path) > 0


def load_raw(spec: Spec, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load a spec into one raw ``datasets.Dataset`` (local files only, never the network).

    ``.jsonl``/``.json`` -> the ``json`` builder, ``.txt`` -> ``text`` (one row per paragraph,
    field ``text``), ``.parquet`` -> ``parquet``; a saved directory -> ``load_from_disk`` (a
    ``DatasetDict`` must have a ``train`` split or exactly one split). Files without rows are
    skipped with a warning; no rows at all is a DataError naming the spec.
    """
    files = resolve_files(spec)
    name = describe(spec)
    if len(files) == 1 and _is_saved_dataset(files[0]):
        loaded = datasets.load_from_disk(files[0])
        if isinstance(loaded, datasets.DatasetDict):
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise DataError(f"{files[0]}: saved DatasetDict has splits {sorted(loaded)}; expected 'train' or exactly one")
        if len(loaded) == 0:
            raise DataError(f"{name}: empty data set (no rows)")
        return loaded

    nonempty = []
    for f in files:
        if _has_rows(f):
            nonempty.append(f)
        else:
            logger.warning("%s: no rows, skipped", f)
    if not nonempty:
        raise DataError(f"{name}: empty data set (no rows)")
    builder = _BUILDERS[_ext(nonempty[0])]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=nonempty, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # arrow/schema errors arrive as many types; report them as one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{name}: could not load as {builder} ({msg})") from e
    if len(ds) == 0:
        raise DataError(f"{name}: empty data set (no rows)")
    logger.info("loaded %d rows from %d file(s): %s", len(ds), len(nonempty), name)
    return ds


def from_text_files(spec: Spec) -> bool:
    """Whether a spec names plain-text files (one document per paragraph, field ``text``)."""
    files = resolve_files(spec)
    return bool(files) and _ext(files[0]) == ".txt"
