"""Build the data sets of a run: files -> raw rows -> tokenized samples -> packed (or plain) rows."""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

import datasets

from .files import DataError, describe, from_text_files, load_raw
from .pack import pack, truncate
from .tokens import Work, tokenize

logger = logging.getLogger(__name__)


@dataclass
class Built:
    """What the engine trains and evaluates on.

    ``train`` / ``eval``: the rows batches are drawn from (packed rows with ``position_ids`` when
    ``data.packing``, else one sample per row). ``eval_samples``: the eval set unpacked, one
    sample per row with ``input_ids``/``labels`` (for generation-based eval: the prompt is the
    masked prefix). ``eval``/``eval_samples`` are None without an eval set. ``cache_path`` is the
    cache directory the rows are memory-mapped from (None when built in memory), ``built`` whether
    this process tokenized them.
    """
    train: datasets.Dataset
    eval: Optional[datasets.Dataset] = None
    eval_samples: Optional[datasets.Dataset] = None
    cache_path: Optional[str] = None
    built: bool = True


def _rows(samples: datasets.Dataset, cfg, name: str, work: Work) -> datasets.Dataset:
    if not cfg.packing:
        return samples
    out = os.path.join(work.work_dir, f"packed-{uuid.uuid4().hex}.arrow") if work.work_dir else None
    return pack(samples, cfg.max_length, name, split_long=cfg.format == "text", out_file=out)


def build_datasets(cfg, tokenizer, cache_dir: Optional[str] = None, work: Optional[Work] = None,
                   answer_format: str = "label") -> Built:
    """Load, template, tokenize and pack train (and eval) data per ``cfg`` (a ``DataConfig``).

    Eval comes from ``cfg.eval`` when set, else the last ``eval_fraction`` of the raw train rows
    (file order, before any shuffle), else None. The result is a pure function of the files, the
    tokenizer and ``cfg``: nothing here is random (shuffling is per epoch, in ``epoch_batches``). ``cache_dir`` is passed to
    ``datasets.load_dataset`` (None: HF default); ``work`` says how the maps run (in memory by
    default; ``cache.load_or_build`` builds on disk). ``answer_format``: "text" trains multiple-choice
    rows to name the gold option's text (``tokens.tokenize``).
    """
    work = work or Work(num_proc=cfg.num_proc or 1)
    train_name = describe(cfg.train) if cfg.train else "data.train"
    raw = load_raw(cfg.train, cache_dir=cache_dir)
    txt = from_text_files(cfg.train)
    raw_eval, eval_name, eval_txt = None, None, False
    if cfg.eval:
        raw_eval, eval_name, eval_txt = load_raw(cfg.eval, cache_dir=cache_dir), describe(cfg.eval), from_text_files(cfg.eval)
    elif cfg.eval_fraction:
        if not 0.0 < cfg.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
        n = len(raw)
        n_eval = max(1, int(round(n * cfg.eval_fraction)))
        if n_eval >= n:
            raise DataError(f"{train_name}: {n} rows are too few to carve eval_fraction={cfg.eval_fraction} from")
        raw, raw_eval = raw.select(range(n - n_eval)), raw.select(range(n - n_eval, n))
        eval_name, eval_txt = f"{train_name} [last {n_eval} of {n} rows]", txt
        logger.info("eval: last %d of %d rows of %s", n_eval, n, train_name)
    train = _rows(tokenize(raw, cfg, tokenizer, train_name, txt, work, answer_format), cfg, train_name, work)
    ev = ev_samples = None
    if raw_eval is not None:
        ev_samples = tokenize(raw_eval, cfg, tokenizer, eval_name, eval_txt, work, answer_format)
        ev = _rows(ev_samples, cfg, eval_name, work)
        if cfg.packing and cfg.format == "text":  # whole documents were kept for packing
            ev_samples = truncate(ev_samples, cfg.max_length)
    logger.info("train: %d rows%s", len(train), f"; eval: {len(ev)} rows" if ev is not None else "")
    return Built(train=train, eval=ev, eval_samples=ev_samples)
