"""Checks of a built RunConfig: the limits each field declares (choices, bounds, not empty),
the settings that contradict each other, then the files on disk. Each problem is one ConfigError
line naming the field; everything here runs before anything heavy loads."""
from __future__ import annotations

import operator
import os

from propulsion_ds.config.messages import fail, show
from propulsion_ds.config.paths import check_data_entries, expand_data_paths
from propulsion_ds.config.schema import RunConfig, leaves
from propulsion_ds.model import is_hub_id

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_declared(cfg: RunConfig) -> None:
    """The choices, bounds and non-emptiness the schema's fields declare (``option``)."""
    values = [(leaf, _get(cfg, leaf.path)) for leaf in leaves()]
    # Choices first, as before the limits moved into the schema: with several bad values, the
    # first one reported stays the same.
    for leaf, value in values:
        choices = leaf.meta.get("choices")
        if choices and value not in choices:
            fail(f"{leaf.path}: expected one of {', '.join(choices)}, got {show(value)}")
    if isinstance(cfg.resume, str) and cfg.resume != "auto":
        fail(f"resume: expected false, true or \"auto\", got {show(cfg.resume)}")
    for leaf, value in values:
        for op, bound in leaf.meta.get("bounds", ()):
            if value is not None and not _OPS[op](value, bound):
                fail(f"{leaf.path}: must be {op} {bound}, got {show(value)}")
    for leaf, value in values:
        hint = leaf.meta.get("not_empty")
        if hint and value == "":
            fail(f"{leaf.path}: must not be empty" + (f" ({hint})" if isinstance(hint, str) else ""))


def check_contradictions(cfg: RunConfig) -> None:
    """Settings that are each fine but cannot go together, and the shape of the data specs."""
    if cfg.data.template is not None and not cfg.data.template.strip():
        fail("data.template: must not be empty (use null for the default template)")
    t = cfg.train
    if t.max_steps is not None and t.epochs is not None:
        fail("train: set max_steps or epochs, not both "
             f"(train.max_steps={t.max_steps}, train.epochs={t.epochs})")
    if t.max_steps is None and t.epochs is None:
        fail("train: set one of them, max_steps or epochs (neither train.max_steps nor "
             "train.epochs is set)")
    for name in ("train", "eval"):
        spec = getattr(cfg.data, name)
        if spec is None:
            continue
        if spec == "" or spec == []:
            fail(f"data.{name}: must be set (a file, glob or directory, or a list of them)"
                 if name == "train" else "data.eval: must not be empty (use null for no eval set)")
        check_data_entries(spec, f"data.{name}")
    if cfg.eval.metric == "choice":
        if cfg.data.format != "instruction":
            fail(f"eval.metric: \"choice\" needs data.format \"instruction\", got {show(cfg.data.format)}")
        if cfg.data.eval is None:
            fail("eval.metric: \"choice\" scores the data.eval files; set data.eval")
        if cfg.eval.generate:
            fail("eval.generate: must be false with eval.metric \"choice\" (candidates are scored, "
                 "not generated)")
    if cfg.data.eval is not None and cfg.data.eval_fraction > 0:
        fail(f"data: set eval or eval_fraction, not both "
             f"(data.eval_fraction={cfg.data.eval_fraction})")


def _isdir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):
        return False


def check_files(cfg: RunConfig) -> None:
    """The model and tokenizer directories, the data files and output_dir, on disk."""
    model = cfg.model.name_or_path
    if not _isdir(model) and not is_hub_id(model):
        fail(f"model.name_or_path: directory not found: {model!r} (a local model directory, "
             f"relative to the config file's directory, or a Hugging Face Hub id org/name)")
    if _isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        fail(f"model.name_or_path: {model!r} has no config.json, not a transformers model directory")
    tok = cfg.tokenizer.name_or_path
    if tok is not None and not _isdir(tok) and not is_hub_id(tok):
        fail(f"tokenizer.name_or_path: directory not found: {tok!r}")
    expand_data_paths(cfg.data.train, "data.train", cfg.data.format)
    if cfg.data.eval is not None:
        expand_data_paths(cfg.data.eval, "data.eval", cfg.data.format)
    try:
        out_is_file = os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir)
    except (OSError, ValueError):
        out_is_file = False
    if out_is_file:
        fail(f"output_dir: {cfg.output_dir!r} exists and is not a directory")

