"""The training recipe: setup -> train -> save, read top to bottom (torchtune's recipe shape)."""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import torch

from . import checkpoint, data, distributed as dist
from .adapter import save_adapter
from .config import RunConfig
from .config_load import config_to_dict, resolve_deepspeed
from .metrics import estimate_mfu, gpu_peak_flops, peak_memory_bytes, propulsion_stats
from .model import load_base_model, load_tokenizer, vocab_size
from .propulsion import DELTA_NAME, channel_scales, inject, trainable_parameters
from .schedule import lr_lambda

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75           # EX_TEMPFAIL: a checkpoint was written on a signal; resume me
FINISHED_MARKER = "FINISHED"


class TrainingError(RuntimeError):
    """The run stopped on purpose (diverged, refused); the message says why and what is kept."""


class OutputDirError(ValueError):
    """The output directory holds a run this invocation would overwrite."""


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""


class Trainer:
    def __init__(self, cfg: RunConfig, overwrite: bool = False):
        self.cfg = cfg
        self.overwrite = overwrite
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.skipped_batches = 0
        self.stop_signal = 0
        self.writer = None
        self.history: list[dict] = []

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        resume_step = self._check_output_dir()
        dist.init_distributed(cfg.distributed.timeout_minutes)
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.model.trust_remote_code)
        if self.rank != 0:
            import datasets
            datasets.disable_progress_bars()
        self.pad_id = data.pad_token_id(self.tokenizer)
        self.train_ds, self.eval_ds = data.build_datasets(cfg.data, self.tokenizer, cfg.train.seed)
        mbs = cfg.train.micro_batch_size
        if self.eval_ds is not None and data.batches_per_epoch(len(self.eval_ds), mbs, self.world) == 0:
            raise data.DataError(f"the eval set has {len(self.eval_ds)} rows, fewer than micro_batch_size "
                                 f"x ranks = {mbs * self.world}: add eval data or raise data.eval_fraction")
        self.batches_per_epoch = data.batches_per_epoch(len(self.train_ds), cfg.train.micro_batch_size,
                                                        self.world)
        accum = cfg.train.gradient_accumulation_steps
        if self.batches_per_epoch < accum:
            raise data.DataError(
                f"data.train gives {self.batches_per_epoch} micro-batches per rank per epoch, fewer than "
                f"train.gradient_accumulation_steps={accum}: add data or lower the batch settings")
        self.steps_per_epoch = self.batches_per_epoch // accum
        self.max_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

        self.ds_config = resolve_deepspeed(cfg, self.world, total_steps=self.max_steps)
        self.model, self._hf_ds = load_base_model(cfg.model, self.ds_config)
        data.check_vocab(self.tokenizer, vocab_size(self.model))
        self.targets = inject(self.model, cfg.propulsion)
        self.model.train()
        self.engine = self._build_engine()
        self.trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                             for p in trainable_parameters(self.model))
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                            for p in self.model.parameters())
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        log.info("Propulsion on %d modules, %d trainable of %d parameters; %d steps",
                 len(self.targets), self.trainable, self.n_params, self.max_steps)
        if resume_step is not None:
            self.load_checkpoint(resume_step)
        self._install_signal_handlers()

    def _check_output_dir(self) -> int | None:
        """Decide resume vs fresh start before anything heavy; refuse to clobber a run."""
        step = checkpoint.latest_step(self.ckpt_root)
        finished = (self.out / FINISHED_MARKER).is_file()
        resume = self.cfg.resume
        if resume is True and step is None:
            raise OutputDirError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        if resume in (True, "auto") and step is not None:
            return step
        if self.overwrite:
            return None
        if finished or step is not None:
            what = "a finished run" if finished else f"checkpoints up to step {step}"
            raise OutputDirError(f"output_dir {self.out} already holds {what}: pass --resume to continue "
                                 f"or --overwrite to start again")
        return None

    def _build_engine(self):
        import deepspeed

        cfg = self.cfg
        params = trainable_parameters(self.model)
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        schedule = lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, self.max_steps)
        engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=params, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        return engine

    def _fingerprint(self) -> dict:
        return {"model": self.cfg.model.name_or_path, "propulsion": self.cfg.propulsion.to_dict(),
                "trainable": self.trainable, "targets": len(self.targets)}

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signum
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    # ---------------------------------------------------------------- train
    def _micro_batches(self):
        """This rank's micro-batches from the saved position on, epoch after epoch."""
        t = self.cfg.train
        while True:
            plan = data.epoch_batches(self.train_ds, t.micro_batch_size, self.rank, self.world,
                                      t.seed, self.epoch, start=self.batch_in_epoch)
            for idx in plan:
                self.batch_in_epoch += 1
                yield self._device(data.get_batch(self.train_ds, idx, self.pad_id))
            self.epoch += 1
            self.batch_in_epoch = 0

    def _device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def _good_micro_batch(self, batches) -> tuple[float, float, float, float]:
        """Forward/backward one micro-batch that is finite on every rank; drop and count the rest."""
        while True:
            batch = next(batches)
            out = self.engine(**batch)
            finite, = dist.all_reduce([float(not torch.isfinite(out.loss))])
            if finite == 0:
                self.engine.backward(out.loss)
                self.engine.step()
                n = float((batch["labels"][:, 1:] != -100).sum())
                return (out.loss.item() * n, n, float(batch["attention_mask"].sum()),
                        float(batch["input_ids"].shape[0]))
            # A non-finite loss would poison the vectors through Adam: skip it on all ranks alike.
            self.bad_steps += 1
            self.skipped_batches += 1
            log.warning("step %d: non-finite loss, micro-batch skipped (%d in a row)",
                        self.step + 1, self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                last = checkpoint.latest_step(self.ckpt_root)
                raise TrainingError(
                    f"{self.bad_steps} consecutive micro-batches with non-finite loss "
                    f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped. Last good "
                    f"checkpoint: {self.ckpt_root / f'step_{last}' if last is not None else 'none'}")

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.step == 0 and self.eval_ds is not None:
            self.evaluate()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=self.rank != 0, desc="train",
                   unit="step", dynamic_ncols=True)
        batches = self._micro_batches()
        while self.step < self.max_steps:
            start = time.perf_counter()
            sums = [0.0, 0.0, 0.0, 0.0]
            for _ in range(cfg.train.gradient_accumulation_steps):
                sums = [a + b for a, b in zip(sums, self._good_micro_batch(batches))]
                self.bad_steps = 0
            mem = [0.0] * self.world
            mem[self.rank] = float(peak_memory_bytes())
            reduced = dist.all_reduce(sums + [float(self.stop_signal)] + mem)
            loss_sum, n_targets, tokens, rows, stop = reduced[:5]
            self.step += 1
            self.tokens_seen += int(tokens)
            record = self._log_step(loss_sum / max(n_targets, 1.0), tokens, rows,
                                    time.perf_counter() - start, reduced[5:])
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if stop:
                self.save_checkpoint()
                bar.close()
                raise Preempted(f"signal {int(stop)} received: checkpoint step_{self.step} written "
                                f"under {self.ckpt_root}; resume with --resume")
            if self.step % cfg.eval.every_steps == 0 and self.eval_ds is not None:
                self.evaluate()
            if self.step % cfg.checkpoint.every_steps == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        bar.close()
        if self.eval_ds is not None and self.step % cfg.eval.every_steps != 0:
            self.evaluate()
        self.save_checkpoint()
        if self.rank == 0:
            (self.out / FINISHED_MARKER).write_text(f"{self.step}\n")
        return self.history

    # ---------------------------------------------------------------- logging
    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_step(self, loss, tokens, rows, elapsed, mem_per_rank) -> dict:
        record = {"step": self.step, "loss": loss, "lr": self.engine.get_lr()[0],
                  "grad_norm": _float(self.engine.get_global_grad_norm()),
                  "tokens_per_s": tokens / elapsed, "samples_per_s": rows / elapsed,
                  "step_time_s": elapsed, "skipped_batches": self.skipped_batches}
        mfu = estimate_mfu(self.n_params, record["tokens_per_s"] / self.world, gpu_peak_flops())
        if mfu is not None:
            record["mfu"] = mfu
        self._record(record)
        if self.writer and self.step % self.cfg.logging.every_steps == 0:
            w = self.writer
            w.add_scalar("train/loss", loss, self.step)
            w.add_scalar("train/lr", record["lr"], self.step)
            if record["grad_norm"] is not None:
                w.add_scalar("train/grad_norm", record["grad_norm"], self.step)
            w.add_scalar("perf/tokens_per_s", record["tokens_per_s"], self.step)
            w.add_scalar("perf/samples_per_s", record["samples_per_s"], self.step)
            w.add_scalar("train/skipped_batches", self.skipped_batches, self.step)
            if mfu is not None:
                w.add_scalar("perf/mfu", mfu, self.step)
            for r, m in enumerate(mem_per_rank):
                w.add_scalar(f"memory/peak_mb_rank{r}", m / 2**20, self.step)
        return record

    def _full_delta(self) -> torch.Tensor:
        """The vectors in fp32: DeepSpeed's master copy where it keeps one (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param
        from .adapter import gathered

        p = getattr(self.model, DELTA_NAME)
        full = safe_get_full_fp32_param(p)
        if full is None:
            with gathered([p]):
                full = p.detach().float().clone()
        return full.float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)

    def log_propulsion_stats(self, delta: torch.Tensor) -> None:
        if not self.writer:
            return
        per_layer, values = propulsion_stats(channel_scales(self.model, delta))
        for name, v in per_layer.items():
            self.writer.add_scalar(f"propulsion/mean_abs_zk_minus_1/{name}", v, self.step)
        self.writer.add_histogram("propulsion/zk", values, self.step)
        self.writer.flush()

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        ev = self.cfg.eval
        plan = data.epoch_batches(self.eval_ds, self.cfg.train.micro_batch_size, self.rank, self.world,
                                  0, 0, shuffle=False)
        self.engine.eval()
        loss_sum = n_sum = 0.0
        for idx in plan[: ev.max_batches]:
            batch = self._device(data.get_batch(self.eval_ds, idx, self.pad_id))
            out = self.engine(**batch)
            n = float((batch["labels"][:, 1:] != -100).sum())
            loss_sum += out.loss.float().item() * n
            n_sum += n
        self.engine.train()
        loss_sum, n_sum = dist.all_reduce([loss_sum, n_sum])
        loss = loss_sum / max(n_sum, 1.0)
        record = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        self._record(record)
        if self.writer:
            self.writer.add_scalar("eval/loss", loss, self.step)
            self.writer.add_scalar("eval/perplexity", record["eval_ppl"], self.step)
        log.info("step %d eval loss %.4f ppl %.2f", self.step, loss, record["eval_ppl"])
        self.log_propulsion_stats(self._full_delta())
        return record

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "tokens_seen": self.tokens_seen, "skipped_batches": self.skipped_batches}
        checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.checkpoint.keep_last,
                        self._fingerprint())
        save_adapter(self.model, self.out / "adapter", delta=self._full_delta())
        if self.writer:
            self.writer.flush()

    def load_checkpoint(self, step: int) -> None:
        checkpoint.check_fingerprint(self.ckpt_root, step, self._fingerprint())
        state = checkpoint.load(self.engine, self.ckpt_root, step)
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.skipped_batches = state.get("skipped_batches", 0)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", self.ckpt_root / f"step_{step}", self.step)

    def cleanup(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None


def _float(x):
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the resumed step so metrics.jsonl reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def run(cfg: RunConfig, overwrite: bool = False) -> list[dict]:
    trainer = Trainer(cfg, overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
