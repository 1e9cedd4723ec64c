"""The training recipe: setup -> train -> save, read top to bottom (torchtune's recipe shape)."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from propulsion_ds import data, distributed as dist
from propulsion_ds.train import checkpoint, gen_eval
from propulsion_ds.method.adapter import save_adapter, trained_biases
from propulsion_ds.config import RunConfig
from propulsion_ds.config.load import config_to_dict, expand_data_paths, resolve_deepspeed
from propulsion_ds.train.guards import UpdateGuard, guarded_adamw, guarded_lambda_lr
from propulsion_ds.train.metrics import estimate_mfu, gpu_peak_flops, peak_memory_bytes, propulsion_stats
from propulsion_ds.model import (check_attn_implementation, load_base_model, load_tokenizer, resolve_model_path,
                    vocab_size)
from propulsion_ds.method.propulsion import DELTA_NAME, channel_scales, inject, trainable_parameters
from propulsion_ds.train.schedule import lr_lambda
from propulsion_ds.errors import TrainingError, OutputDirError, Preempted, OutputWriteError  # noqa: F401

log = logging.getLogger(__name__)

FINISHED_MARKER = "FINISHED"
# What a run writes into output_dir: --overwrite (or a fresh start over a run that died before
# its first checkpoint) removes exactly these, nothing else a user keeps there.
RUN_OUTPUTS = ("checkpoints", "adapter", "tensorboard", "metrics.jsonl", "config.json", FINISHED_MARKER)





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
        self.bad_steps = 0            # non-finite micro-batches / updates since the last applied update
        self.skipped_batches = 0      # micro-batches dropped for a non-finite loss
        self.skipped_steps = 0        # optimizer updates discarded for a non-finite gradient
        self.stop_signal = 0
        self.writer = None
        self.history: list[dict] = []
        self._grad_bad = False
        self._io_error: BaseException | None = None
        self._guard = UpdateGuard()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        # First: a SIGTERM/SIGUSR1 during the (long) set-up must not kill the process unsaved.
        self._install_signal_handlers()
        resume_step = self._check_output_dir()
        dist.init_distributed(cfg.distributed.timeout_minutes)
        self.rank, self.world = dist.rank(), dist.world_size()
        check_attn_implementation(cfg.model)      # before the long steps, on every rank alike
        torch.manual_seed(cfg.train.seed)
        # A Hub id is fetched once (rank 0 first) or read from the local cache.
        self.model_path = resolve_model_path(cfg.model.name_or_path, rank=self.rank, barrier=dist.barrier)
        tok_path = (self.model_path if cfg.tokenizer.name_or_path is None else resolve_model_path(
            cfg.tokenizer.name_or_path, rank=self.rank, barrier=dist.barrier, field="tokenizer.name_or_path"))
        self.tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
        if self.rank != 0:
            import datasets
            datasets.disable_progress_bars()
        self.pad_id = data.pad_token_id(self.tokenizer)
        # Tokenized once per storage domain, memory-mapped by every rank, reused by a requeued job.
        built = data.load_or_build(cfg.data, self.tokenizer, data_cache_dir(cfg), rank=self.rank,
                                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                                   barrier=dist.patient_barrier())
        self.train_ds, self.eval_ds, self.eval_samples = built.train, built.eval, built.eval_samples
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

        # "auto" ZeRO buckets follow the model's width (h*h, 0.9*h*h, 10*h), as the memory
        # planner assumes; without it DeepSpeed's 5e8-element defaults cost ~1 GB per GPU.
        self.ds_config = resolve_deepspeed(cfg, self.world, _hidden_size(self.model_path, cfg.model),
                                           total_steps=self.max_steps)
        self.model, self._hf_ds = load_base_model(cfg.model, self.ds_config, self.model_path)
        data.check_vocab(self.tokenizer, vocab_size(self.model))
        self.targets = inject(self.model, cfg.propulsion)
        self.trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                             for p in trainable_parameters(self.model))
        if resume_step is not None:
            # Same model, method settings and world size, files readable with the restricted
            # unpickler: checked before anything in output_dir is touched.
            checkpoint.check_resumable(self.ckpt_root, resume_step, self._fingerprint())
        self.model.train()
        self.engine = self._build_engine()
        self._log_partitioning()
        for p in trainable_parameters(self.model):
            p.register_hook(self._check_grad)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                            for p in self.model.parameters())
        # Nothing is written before this point: bad input fails with output_dir untouched.
        self._prepare_output_dir(resume_step)
        error = None
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                checkpoint._write_text_atomic(self.out / "config.json",
                                              json.dumps(config_to_dict(cfg), indent=2) + "\n")
                from torch.utils.tensorboard import SummaryWriter
                # purge_step hides events a killed run logged after the checkpoint we resume from.
                self.writer = SummaryWriter(str(self.out / "tensorboard"),
                                            purge_step=None if resume_step is None else resume_step + 1)
            except OSError as e:
                error = e
        checkpoint.agree(error, f"cannot write to output_dir {self.out}", self.out)
        log.info("Propulsion on %d modules, %d trainable of %d parameters; %d steps",
                 len(self.targets), self.trainable, self.n_params, self.max_steps)
        if resume_step is not None:
            self.load_checkpoint(resume_step)

    def _check_output_dir(self) -> int | None:
        """Decide resume vs fresh start before anything heavy; refuse to clobber a run."""
        step = checkpoint.latest_step(self.ckpt_root)
        finished = (self.out / FINISHED_MARKER).is_file()
        resume = self.cfg.resume
        if resume is True and self.overwrite:
            raise OutputDirError("--resume and --overwrite contradict each other: pass one of them")
        config = self.out / "config.json"
        if config.is_file() and not _is_run_config(config):
            raise OutputDirError(f"output_dir {self.out} holds a config.json that is not a propulsion run "
                                 f"config (a model directory?): choose another output_dir")
        if resume is True and step is None:
            raise OutputDirError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        if resume in (True, "auto") and step is not None:
            return step
        if self.overwrite:
            return None
        adapter = self.out / "adapter" / "propulsion.safetensors"
        if finished or step is not None or adapter.is_file():
            what = ("a finished run" if finished else f"checkpoints up to step {step}" if step is not None
                    else f"a trained adapter ({adapter})")
            raise OutputDirError(f"output_dir {self.out} already holds {what}: pass --resume to continue "
                                 f"or --overwrite to start again")
        return None

    def _prepare_output_dir(self, resume_step: int | None) -> None:
        """Rank 0, after every rank has decided resume-or-not: clear or tidy output_dir."""
        error = None
        if self.rank == 0:
            try:
                for trash in self.out.glob(".*.removing-*"):      # left by a kill mid-clear
                    shutil.rmtree(trash, ignore_errors=True)
                if resume_step is None:
                    # A fresh start: --overwrite, or leftovers of a run that died before its first
                    # checkpoint. Stale checkpoints must go, or `latest` could point into the old run.
                    stale = [n for n in RUN_OUTPUTS if (self.out / n).exists()]
                    if stale:
                        log.info("output_dir %s: removing the previous run's %s", self.out, ", ".join(stale))
                    for name in stale:
                        path = self.out / name
                        if path.is_dir() and not path.is_symlink():
                            trash = self.out / f".{name}.removing-{os.getpid()}"
                            os.replace(path, trash)
                            shutil.rmtree(trash, ignore_errors=True)
                        else:
                            path.unlink()
                else:
                    checkpoint.clean_partial(self.ckpt_root)
                    for tmp in (self.out / "adapter").glob("*.tmp"):
                        tmp.unlink(missing_ok=True)
                    if self.max_steps > resume_step:
                        (self.out / FINISHED_MARKER).unlink(missing_ok=True)
            except OSError as e:
                error = e
        checkpoint.agree(error, f"cannot prepare output_dir {self.out}", self.out)

    def _build_engine(self):
        import deepspeed

        cfg = self.cfg
        params = trainable_parameters(self.model)
        # Ours, never DeepSpeed's (config validation refuses an optimizer section): the guard can
        # then veto a non-finite update on every ZeRO stage.
        optimizer = guarded_adamw(params, self._guard, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        schedule = lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, self.max_steps)
        # ZeRO-0 with bf16/fp16 wraps the optimizer in FP16_UnfusedOptimizer, whose set-up runs
        # optimizer.step() on zero grads: Adam's step count would start one ahead. Veto it.
        self._guard.skip = True
        try:
            engine, *_ = deepspeed.initialize(
                model=self.model, model_parameters=params, optimizer=optimizer, config=self.ds_config,
                lr_scheduler=lambda opt: guarded_lambda_lr(opt, schedule, self._guard))
        finally:
            self._guard.skip = False
        stage = self._stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self._fp16 = bool(self.ds_config.get("fp16", {}).get("enabled"))
        # ZeRO-0 in fp32 clips without keeping the norm (get_global_grad_norm() is None): measure
        # it ourselves at the boundary, where the gradients are already all-reduced.
        self._own_grad_norm = stage == 0 and not self._fp16 and not self.ds_config.get("bf16", {}).get("enabled")
        self._grad_norm = None
        self._lr = float(cfg.train.lr)
        return engine

    def _log_partitioning(self) -> None:
        """Say how much of the model ZeRO-3 really partitions: tensors at or under
        stage3_param_persistence_threshold stay whole on every rank (a tiny model: all of them)."""
        params = [p for p in self.model.parameters() if hasattr(p, "ds_tensor")]
        if not params:
            return
        # Persistent tensors keep a shard too, but are gathered once and kept whole on every rank.
        split = [p for p in params if not getattr(p, "ds_persist", False) and p.ds_tensor.numel() < p.ds_numel]
        log.info("ZeRO-3 partitioning: %d of %d parameter tensors partitioned; this rank holds %d of "
                 "%d elements", len(split), len(params), sum(p.ds_tensor.numel() for p in params),
                 sum(p.ds_numel for p in params))

    def _trainable_grad_norm(self) -> float:
        grads = [p.grad.float().norm() for p in trainable_parameters(self.model) if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    def _fingerprint(self) -> dict:
        """What a resume must match: the data position and RNG mean nothing under other values.

        Keys are config fields, so a refusal names the field to fix.
        """
        c, t, d = self.cfg, self.cfg.train, self.cfg.data
        return {"model": c.model.name_or_path, "propulsion": c.propulsion.to_dict(),
                "trainable": self.trainable, "targets": len(self.targets),
                "train.micro_batch_size": t.micro_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.seed": t.seed, "data.train": _data_files(d.train), "data.format": d.format,
                "data.max_length": d.max_length, "data.packing": d.packing, "data.template": d.template,
                "data.text_field": d.text_field, "data.eval": None if d.eval is None else _data_files(d.eval),
                "data.eval_fraction": d.eval_fraction}

    def _check_grad(self, grad: torch.Tensor):
        """Tensor hook on every trainable parameter: note a non-finite local gradient."""
        if not self._grad_bad and not bool(torch.isfinite(grad).all()):
            self._grad_bad = True
        return None

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

    def _stop_if_diverged(self, what: str) -> None:
        log.warning("step %d: %s (%d in a row)", self.step + 1, what, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} non-finite losses or gradients in a row, the last: {what} "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped. Last good "
                f"checkpoint: {self._last_good()}")

    def _last_good(self) -> str:
        last = checkpoint.latest_step(self.ckpt_root)
        return str(self.ckpt_root / f"step_{last}") if last is not None else "none"

    def _forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of the per-token losses of one micro-batch (fp32), not their mean."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # use_cache=False: a cache switches off transformers' packed-document isolation.
        out = self.engine(**inputs, use_cache=False)
        return token_loss_sum(out.logits, batch["labels"])

    def train_loss_sum(self, batch: dict) -> torch.Tensor:
        """The training forward of one micro-batch (eval does not come here): the seam the
        fault-injection entry point (tests/fault_entry.py) wraps."""
        return self._forward_loss_sum(batch)

    def _window(self, batches) -> tuple[list[dict], float]:
        """The next accumulation window's micro-batches and its target tokens on all ranks."""
        window = [next(batches) for _ in range(self.cfg.train.gradient_accumulation_steps)]
        n, = dist.all_reduce([float(sum(target_tokens(b) for b in window))])
        return window, n

    def _train_step(self, batches) -> list[float]:
        """One applied optimizer update; this rank's sums over the window it used.

        Objective (DESIGN §1 "Training arithmetic"): the sum of per-token losses over every
        micro-batch of the window on every rank, divided by the window's target tokens on all
        ranks. DeepSpeed divides each backward by the accumulation steps and averages gradients
        over ranks, so each micro-batch's loss sum is multiplied by world * accum / n_window:
        any split of the same samples into ranks x micro-batch x accumulation gives one update.

        A micro-batch whose loss is not finite on some rank is dropped on every rank and the next
        one takes its place; the window's token count is taken again, so the objective stays exact
        when it is the window's first micro-batch (always, without accumulation). Later in a window
        the micro-batches already backpropagated keep the count they were scaled with.
        """
        accum, world = self.cfg.train.gradient_accumulation_steps, self.world
        while True:
            window, n_window = self._window(batches)
            sums = [0.0, 0.0, 0.0, 0.0]
            for i in range(accum):
                while True:
                    loss_sum = self.train_loss_sum(window[i])
                    bad, = dist.all_reduce([float(not torch.isfinite(loss_sum.detach()))])
                    if bad == 0:
                        break
                    # A non-finite loss would poison the vectors through Adam: drop it on all ranks.
                    self.bad_steps += 1
                    self.skipped_batches += 1
                    self._stop_if_diverged("non-finite loss, micro-batch dropped")
                    window[i] = next(batches)
                    n_window, = dist.all_reduce([float(sum(target_tokens(b) for b in window))])
                self.engine.backward(loss_sum * (world * accum / max(n_window, 1.0)))
                if i == accum - 1:
                    applied = self._boundary_step()
                else:
                    self.engine.step()
                b = window[i]
                sums = [sums[0] + float(loss_sum.detach()), sums[1] + target_tokens(b),
                        sums[2] + float(data.real_tokens(b)), sums[3] + float(b["input_ids"].shape[0])]
            if applied:
                self.bad_steps = 0
                return sums
            self.skipped_steps += 1
            if not self._fp16:      # fp16: DeepSpeed's loss scaler owns overflow skips
                self.bad_steps += 1
            self._stop_if_diverged("non-finite gradient, update discarded")

    def _boundary_step(self) -> bool:
        """engine.step() at the accumulation boundary; whether the update was applied.

        Not applied: a rank saw a non-finite gradient (our guard vetoes AdamW and the schedule on
        every rank alike) or DeepSpeed skipped the step itself (fp16 overflow, ZeRO-3 non-finite
        norm). The LR read here, before the step, is the one this update uses.
        """
        grad_bad, = dist.all_reduce([float(self._grad_bad)])
        self._grad_bad = False
        self._guard.skip = grad_bad != 0
        skipped_before = self.engine.skipped_steps
        if self._own_grad_norm:
            self._grad_norm = self._trainable_grad_norm()
        self._lr = float(self.engine.get_lr()[0])
        try:
            self.engine.step()
        finally:
            self._guard.skip = False
        return grad_bad == 0 and self.engine.skipped_steps == skipped_before

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.step == 0 and self.eval_ds is not None:
            self.evaluate()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=self.rank != 0, desc="train",
                   unit="step", dynamic_ncols=True)
        batches = self._micro_batches()
        try:
            while self.step < self.max_steps:
                start = time.perf_counter()
                sums = self._train_step(batches)
                mem = [0.0] * self.world
                mem[self.rank] = float(peak_memory_bytes())
                reduced = dist.all_reduce(sums + [float(self.stop_signal > 0), float(self._io_error is not None)] + mem)
                loss_sum, n_targets, tokens, rows, stop, io_error = reduced[:6]   # sums on all ranks
                if io_error:
                    self._raise_io_error()
                self.step += 1
                self.tokens_seen += int(tokens)
                record = self._log_step(loss_sum / max(n_targets, 1.0), tokens, rows,
                                        time.perf_counter() - start, reduced[6:])
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if stop:
                    self.save_checkpoint()
                    what = (signal.Signals(self.stop_signal).name if self.stop_signal
                            else "a stop signal on another rank")
                    raise Preempted(f"{what} received: checkpoint step_{self.step} written "
                                    f"under {self.ckpt_root}; resume with --resume")
                if self.step % cfg.eval.every_steps == 0 and self.eval_ds is not None:
                    self.evaluate()
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()   # also on errors: the error line must not be glued to the bar
        if self.eval_ds is not None and self.step % cfg.eval.every_steps != 0:
            self.evaluate()
        if checkpoint.latest_step(self.ckpt_root) != self.step:
            self.save_checkpoint()
        else:                       # resumed at the end: the checkpoint exists, rewrite the adapter
            self._check_io()
            self.write_adapter()
        self._check_io()                # the last TensorBoard flush, too
        error = None
        if self.rank == 0:
            try:
                checkpoint._write_text_atomic(self.out / FINISHED_MARKER, f"{self.step}\n")
            except OSError as e:
                error = e
        checkpoint.agree(error, f"cannot write {self.out / FINISHED_MARKER}", self.out)
        return self.history

    def _raise_io_error(self):
        e = self._io_error
        cause = "see rank 0's log" if e is None else " ".join(str(e).split())[:200]
        raise OutputWriteError(
            f"rank 0 could not write metrics or TensorBoard events under {self.out} ({cause}); "
            f"newest checkpoint: {self._last_good()} (resume with --resume)")

    def _rank0_io(self, fn) -> None:
        """Run a rank-0 write; a failure is carried to every rank by the next step's all-reduce."""
        if self._io_error is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - TensorBoard re-raises its writer thread's errors
            self._io_error = e
            log.error("writing under %s failed: %s", self.out, e)

    # ---------------------------------------------------------------- logging
    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            def write():
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            self._rank0_io(write)

    def _log_step(self, loss, tokens, rows, elapsed, mem_per_rank) -> dict:
        record = {"step": self.step, "loss": loss, "lr": self._lr,
                  "grad_norm": _float(self.engine.get_global_grad_norm()) if not self._own_grad_norm
                  else self._grad_norm,
                  "tokens_per_s": tokens / elapsed, "samples_per_s": rows / elapsed,
                  "step_time_s": elapsed, "skipped_batches": self.skipped_batches,
                  "skipped_steps": self.skipped_steps}
        mfu = estimate_mfu(self.n_params, record["tokens_per_s"] / self.world, gpu_peak_flops())
        if mfu is not None:
            record["mfu"] = mfu
        self._record(record)
        if self.writer and self.step % self.cfg.logging.every_steps == 0:
            self._rank0_io(lambda: self._tb_step(record, mem_per_rank))
        return record

    def _tb_step(self, record: dict, mem_per_rank) -> None:
        w, step = self.writer, self.step
        w.add_scalar("train/loss", record["loss"], step)
        w.add_scalar("train/lr", record["lr"], step)
        if record["grad_norm"] is not None:
            w.add_scalar("train/grad_norm", record["grad_norm"], step)
        w.add_scalar("perf/tokens_per_s", record["tokens_per_s"], step)
        w.add_scalar("perf/samples_per_s", record["samples_per_s"], step)
        w.add_scalar("train/skipped_batches", record["skipped_batches"], step)
        w.add_scalar("train/skipped_steps", record["skipped_steps"], step)
        if record.get("mfu") is not None:
            w.add_scalar("perf/mfu", record["mfu"], step)
        for r, m in enumerate(mem_per_rank):
            w.add_scalar(f"memory/peak_mb_rank{r}", m / 2**20, step)

    def _full_delta(self) -> torch.Tensor:
        """The vectors in fp32: DeepSpeed's master copy where it keeps one (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param
        from propulsion_ds.method.adapter import gathered

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

        def write():
            for name, v in per_layer.items():
                self.writer.add_scalar(f"propulsion/mean_abs_zk_minus_1/{name}", v, self.step)
            self.writer.add_histogram("propulsion/zk", values, self.step)
            self.writer.flush()
        self._rank0_io(write)

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
            loss_sum += float(self._forward_loss_sum(batch))
            n_sum += target_tokens(batch)
        self.engine.train()
        loss_sum, n_sum = dist.all_reduce([loss_sum, n_sum])
        loss = loss_sum / max(n_sum, 1.0)
        record = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        if ev.generate and self.eval_samples is not None:
            result = gen_eval.generation_eval(
                self.engine.module, self.tokenizer, self.eval_samples, ev, rank=self.rank,
                world_size=self.world, device=self.engine.device, zero3=self._stage == 3)
            record.update(gen_eval.log_generation(self.writer, result, self.step, run=self._rank0_io))
            log.info("step %d eval accuracy %s (%d of %d)", self.step, result["accuracy"],
                     result["correct"], result["n"])
        self._record(record)
        if self.writer:
            self._rank0_io(lambda: (self.writer.add_scalar("eval/loss", loss, self.step),
                                    self.writer.add_scalar("eval/perplexity", record["eval_ppl"], self.step)))
        log.info("step %d eval loss %.4f ppl %.2f", self.step, loss, record["eval_ppl"])
        self.log_propulsion_stats(self._full_delta())
        return record

    # ---------------------------------------------------------------- checkpoints
    def _check_io(self) -> None:
        """Collective: a metrics/TensorBoard write that failed on rank 0 stops every rank before a
        checkpoint is written, so no checkpoint ever lies past a hole in metrics.jsonl."""
        failed, = dist.all_reduce([float(self._io_error is not None)])
        if failed:
            self._raise_io_error()

    def save_checkpoint(self) -> None:
        self._check_io()
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "tokens_seen": self.tokens_seen, "skipped_batches": self.skipped_batches,
                 "skipped_steps": self.skipped_steps}
        checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.checkpoint.keep_last,
                        self._fingerprint())
        self.write_adapter()

    def write_adapter(self) -> None:
        """Collective; rank 0 writes adapter/ (temp file + rename, so never torn)."""
        delta = self._full_delta()                      # collective
        biases = trained_biases(self.model)             # collective; {} without train_bias
        error = None
        if self.rank == 0:
            try:
                save_adapter(self.model, self.out / "adapter", delta=delta, biases=biases)
            except Exception as e:  # noqa: BLE001 - safetensors reports a full disk in its own type
                error = e
        checkpoint.agree(error, f"could not write the adapter under {self.out / 'adapter'}", self.out,
                         f"; checkpoint step_{self.step} is complete: resume with --resume")
        if self.writer:
            self._rank0_io(self.writer.flush)

    def load_checkpoint(self, step: int) -> None:
        checkpoint.check_fingerprint(self.ckpt_root, step, self._fingerprint())
        state = checkpoint.load(self.engine, self.ckpt_root, step)
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.skipped_batches = state.get("skipped_batches", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        dist.barrier()
        log.info("resumed from %s at step %d", self.ckpt_root / f"step_{step}", self.step)

    def cleanup(self) -> None:
        if self.writer:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001 - never mask the error that ended the run
                log.warning("closing TensorBoard writer: %s", e)
            self.writer = None


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json this trainer wrote (only those are ever replaced)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and {"model", "propulsion", "train", "output_dir"} <= set(raw)


def _data_files(spec) -> list:
    """[path, size] of every data file a spec names: a changed file changes the rows."""
    out = []
    for f in expand_data_paths(spec):
        out.append([os.path.abspath(f), os.path.getsize(f) if os.path.isfile(f) else None])
    return out


def data_cache_dir(cfg: RunConfig) -> str:
    """data.cache_dir, else $PROPULSION_CACHE/data, else ~/.cache/propulsion-ds/data (outside
    output_dir: a bad-input run leaves output_dir untouched, and --overwrite keeps the cache)."""
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    root = os.environ.get("PROPULSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "propulsion-ds")
    return os.path.join(root, "data")


def _hidden_size(path: str, model_cfg) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(h) if h else None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the next-token cross-entropy, in fp32 (labels aligned with inputs)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def target_tokens(batch: dict) -> float:
    return float((batch["labels"][:, 1:] != -100).sum())


def _float(x):
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the resumed step so metrics.jsonl reads as one uninterrupted run.

    A line a kill cut short (no newline, not JSON) is dropped too.
    """
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    checkpoint._write_text_atomic(path, "".join(line + "\n" for line in keep))


def run(cfg: RunConfig, overwrite: bool = False) -> list[dict]:
    trainer = Trainer(cfg, overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
