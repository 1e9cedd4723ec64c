"""The data a run trains on: built once per storage domain, and walked micro-batch by
micro-batch from the saved position (the same order for any resume point).

An epoch is a whole number of global batches (micro-batch x ranks x accumulation), so every split
of the same global batch puts the same samples into each update, across epoch boundaries too;
the position is kept as a count of global samples (``TrainingProgress.samples_in_epoch``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from propulsion_ds import data, distributed as dist
from propulsion_ds.data.batches import eval_batches as eval_plan
from propulsion_ds.errors import DataError
from propulsion_ds.train.loss import to_device
from propulsion_ds.train.progress import TrainingProgress

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train: object                 # datasets.Dataset of packed/padded rows
    eval: object | None
    eval_samples: object | None   # unpacked eval rows for generation eval
    pad_id: int
    batches_per_epoch: int        # micro-batches per rank
    steps_per_epoch: int
    max_steps: int
    global_batch: int = 1         # samples per update: micro-batch x ranks x accumulation
    left_out: int = 0             # rows each epoch leaves out (fewer than one global batch)


def load_run_data(cfg, tokenizer, rank: int, world: int) -> RunData:
    if rank != 0:
        import datasets
        datasets.disable_progress_bars()
    # Tokenized once per storage domain, memory-mapped by every rank, reused by a requeued job.
    # eval.answer_format "text" trains multiple-choice rows to name the option's text, as it scores them.
    built = data.load_or_build(cfg.data, tokenizer, data_cache_dir(cfg), rank=rank,
                               local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                               barrier=dist.patient_barrier(), broadcast=dist.broadcast_object,
                               answer_format=cfg.eval.answer_format)
    mbs, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    if built.eval is not None and len(built.eval) == 0:
        raise DataError("the eval set has no rows: add eval data or raise data.eval_fraction")
    n, global_batch = len(built.train), mbs * world * accum
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise DataError(
            f"data.train gives {n} rows, fewer than one global batch (train.micro_batch_size x ranks x "
            f"train.gradient_accumulation_steps = {mbs} x {world} x {accum} = {global_batch}): add data "
            f"or lower the batch settings")
    left_out = n - steps_per_epoch * global_batch
    log.info("data: %d training rows, %d updates of %d samples per epoch; %d rows per epoch left out "
             "(fewer than one global batch, a different draw each epoch)", n, steps_per_epoch, global_batch,
             left_out)
    return RunData(built.train, built.eval, built.eval_samples, data.pad_token_id(tokenizer),
                   steps_per_epoch * accum, steps_per_epoch,
                   cfg.train.max_steps or cfg.train.epochs * steps_per_epoch, global_batch, left_out)


def data_cache_dir(cfg) -> str:
    """data.cache_dir, else $PROPULSION_CACHE/data, else ~/.cache/propulsion-ds/data (outside
    output_dir: a bad-input run leaves output_dir untouched, and --overwrite keeps the cache)."""
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    root = os.environ.get("PROPULSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "propulsion-ds")
    return os.path.join(root, "data")


def data_position(rd: RunData, progress: TrainingProgress, per_draw: int) -> int:
    """This split's micro-batch position in the epoch, from the position in global samples.

    ``per_draw`` = micro-batch x ranks, the samples one micro-batch on every rank draws. A
    checkpoint from before the sample count kept this rank's micro-batches, under the same split
    (its fingerprint held the world size); a position past this epoch's end (such a checkpoint
    counted epochs in micro-batches) starts the next epoch.
    """
    if progress.samples_in_epoch is None:
        progress.samples_in_epoch = progress.batch_in_epoch * per_draw
    samples = progress.samples_in_epoch
    if samples % per_draw:
        raise DataError(
            f"the checkpoint's data position ({samples} samples into epoch {progress.epoch}) is not a whole "
            f"number of micro-batches of train.micro_batch_size x ranks = {per_draw}: resume with a split "
            f"whose micro-batch x ranks divides it")
    if samples // per_draw > rd.batches_per_epoch:
        progress.epoch, progress.samples_in_epoch = progress.epoch + 1, 0
    progress.batch_in_epoch = progress.samples_in_epoch // per_draw
    return progress.batch_in_epoch


def micro_batches(rd: RunData, train_cfg, rank: int, world: int, progress: TrainingProgress, device):
    """This rank's training micro-batches from the saved position on, epoch after epoch."""
    mbs = train_cfg.micro_batch_size
    per_draw = mbs * world
    while True:
        plan = data.epoch_batches(rd.train, mbs, rank, world, train_cfg.seed, progress.epoch,
                                  start=data_position(rd, progress, per_draw),
                                  accumulation=train_cfg.gradient_accumulation_steps)
        for idx in plan:
            progress.batch_in_epoch += 1
            progress.samples_in_epoch += per_draw
            yield to_device(data.get_batch(rd.train, idx, rd.pad_id), device)
        progress.epoch += 1
        progress.batch_in_epoch = progress.samples_in_epoch = 0


def eval_batches(rd: RunData, micro_batch_size: int, rank: int, world: int, max_batches: int, seed: int,
                 device):
    """This rank's eval micro-batches and whether each counts: a seeded sample of
    ``max_batches x micro_batch_size`` rows, the same rows for any number of ranks."""
    for idx, counted in eval_plan(rd.eval, micro_batch_size, rank, world, max_batches * micro_batch_size, seed):
        yield to_device(data.get_batch(rd.eval, idx, rd.pad_id), device), counted
