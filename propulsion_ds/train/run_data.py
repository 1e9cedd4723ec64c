"""The data a run trains on: built once per storage domain, and walked micro-batch by
micro-batch from the saved position (the same order for any resume point)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from propulsion_ds import data, distributed as dist
from propulsion_ds.errors import DataError
from propulsion_ds.train.loss import to_device
from propulsion_ds.train.progress import TrainingProgress


@dataclass
class RunData:
    train: object                 # datasets.Dataset of packed/padded rows
    eval: object | None
    eval_samples: object | None   # unpacked eval rows for generation eval
    pad_id: int
    batches_per_epoch: int        # micro-batches per rank
    steps_per_epoch: int
    max_steps: int


def load_run_data(cfg, tokenizer, rank: int, world: int) -> RunData:
    if rank != 0:
        import datasets
        datasets.disable_progress_bars()
    # Tokenized once per storage domain, memory-mapped by every rank, reused by a requeued job.
    built = data.load_or_build(cfg.data, tokenizer, data_cache_dir(cfg), rank=rank,
                               local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                               barrier=dist.patient_barrier())
    mbs, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    if built.eval is not None and data.batches_per_epoch(len(built.eval), mbs, world) == 0:
        raise DataError(f"the eval set has {len(built.eval)} rows, fewer than micro_batch_size "
                        f"x ranks = {mbs * world}: add eval data or raise data.eval_fraction")
    per_epoch = data.batches_per_epoch(len(built.train), mbs, world)
    if per_epoch < accum:
        raise DataError(
            f"data.train gives {per_epoch} micro-batches per rank per epoch, fewer than "
            f"train.gradient_accumulation_steps={accum}: add data or lower the batch settings")
    steps_per_epoch = per_epoch // accum
    return RunData(built.train, built.eval, built.eval_samples, data.pad_token_id(tokenizer), per_epoch,
                   steps_per_epoch, cfg.train.max_steps or cfg.train.epochs * steps_per_epoch)


def data_cache_dir(cfg) -> str:
    """data.cache_dir, else $PROPULSION_CACHE/data, else ~/.cache/propulsion-ds/data (outside
    output_dir: a bad-input run leaves output_dir untouched, and --overwrite keeps the cache)."""
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    root = os.environ.get("PROPULSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "propulsion-ds")
    return os.path.join(root, "data")


def micro_batches(rd: RunData, train_cfg, rank: int, world: int, progress: TrainingProgress, device):
    """This rank's training micro-batches from the saved position on, epoch after epoch."""
    while True:
        plan = data.epoch_batches(rd.train, train_cfg.micro_batch_size, rank, world, train_cfg.seed,
                                  progress.epoch, start=progress.batch_in_epoch)
        for idx in plan:
            progress.batch_in_epoch += 1
            yield to_device(data.get_batch(rd.train, idx, rd.pad_id), device)
        progress.epoch += 1
        progress.batch_in_epoch = 0


def eval_batches(rd: RunData, micro_batch_size: int, rank: int, world: int, limit: int, device):
    plan = data.epoch_batches(rd.eval, micro_batch_size, rank, world, 0, 0, shuffle=False)
    for idx in plan[:limit]:
        yield to_device(data.get_batch(rd.eval, idx, rd.pad_id), device)
