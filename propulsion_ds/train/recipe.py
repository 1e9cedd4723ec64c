"""The training recipe: setup -> train, read top to bottom (torchtune's recipe shape).

`train()` is the whole loop: one optimizer update (forward -> backward -> step over an
accumulation window), then log, checkpoint and eval. Each job it calls is a component of its own
in this package: checkpointer (output_dir: resume or fresh, checkpoints, adapter), run_data (data
and position), ds_engine (DeepSpeed and the update veto), nonfinite (NaN guard), metrics (the per-step
all-reduce, the record, metrics.jsonl, TensorBoard, tqdm), progress (resume state). docs/ARCHITECTURE.md
draws it.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch

from propulsion_ds import data, distributed as dist
from propulsion_ds.config import RunConfig
from propulsion_ds.config.load import config_to_dict
from propulsion_ds.config.deepspeed import resolve_deepspeed
from propulsion_ds.errors import Preempted, StopDuringEval
from propulsion_ds.method.propulsion import channel_scales, inject, trainable_parameters
from propulsion_ds.model import (check_attn_implementation, load_base_model, load_tokenizer, resolve_model_path,
                                 vocab_size)
from propulsion_ds.eval.choice import score_questions
from propulsion_ds.eval.choice_eval import choice_values, load_eval_questions
from propulsion_ds.train import gen_eval
from propulsion_ds.train.checkpointer import Checkpointer, fingerprint, full_delta
from propulsion_ds.train.ds_engine import DSEngine, log_partitioning, model_width, numel
from propulsion_ds.train.loss import forward_loss_sum, target_tokens
from propulsion_ds.train.metrics import (MetricsSink, WindowSums, estimate_mfu, gpu_peak_flops, peak_memory_bytes,
                                         propulsion_stats, reduce_step, window_targets)
from propulsion_ds.train.nonfinite import NonFiniteGuard
from propulsion_ds.train.progress import TrainingProgress
from propulsion_ds.train.run_data import eval_batches, load_run_data, micro_batches
from propulsion_ds.train.signals import StopRequest

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig, overwrite: bool = False):
        self.cfg, self.overwrite = cfg, overwrite
        self.ckpt = Checkpointer(cfg, overwrite)
        self.progress = TrainingProgress()
        self.stop = StopRequest()
        self.sink: MetricsSink | None = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.stop.install()     # first: a SIGTERM during the (long) set-up must not kill us unsaved
        dist.init_distributed(cfg.distributed.timeout_minutes)
        self.rank, self.world = dist.rank(), dist.world_size()
        # output_dir's lock, the same output_dir on every rank, rank 0 decides resume-or-fresh.
        resume_step = self.ckpt.start()
        self.sink = MetricsSink(self.ckpt.out, self.rank, cfg.logging.every_steps)
        check_attn_implementation(cfg.model)      # before the long steps, on every rank alike
        torch.manual_seed(cfg.train.seed)
        # A Hub id is fetched once (rank 0 first) or read from the local cache.
        # The download can outlast distributed.timeout_minutes: the others wait on a patient barrier,
        # made only when a Hub id needs one (every rank resolves the same name alike).
        hub_wait = lambda: dist.patient_barrier()()  # noqa: E731
        model_path = resolve_model_path(cfg.model.name_or_path, rank=self.rank, barrier=hub_wait)
        tok_path = (model_path if cfg.tokenizer.name_or_path is None else resolve_model_path(
            cfg.tokenizer.name_or_path, rank=self.rank, barrier=hub_wait, field="tokenizer.name_or_path"))
        self.tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
        self.data = load_run_data(cfg, self.tokenizer, self.rank, self.world)
        # eval.metric "choice": the raw eval rows as questions, each file reported by its stem
        self.choice_questions = (load_eval_questions(cfg.data, cfg.eval.answer_format)
                                 if cfg.eval.metric == "choice" else None)
        self.max_steps = self.data.max_steps
        self.ds_config = resolve_deepspeed(cfg, self.world, model_width(model_path, cfg.model),
                                           total_steps=self.max_steps)
        self.model, self._hf_ds = load_base_model(cfg.model, self.ds_config, model_path)
        data.check_vocab(self.tokenizer, vocab_size(self.model))
        self.targets = inject(self.model, cfg.propulsion)
        self.trainable = numel(trainable_parameters(self.model))
        self.ckpt.check_resumable(self._fingerprint())
        self.model.train()
        self.ds = DSEngine(self.model, self.ds_config, cfg.train, self.max_steps)
        self.engine = self.ds.engine
        log_partitioning(self.model)
        self.nonfinite = NonFiniteGuard(cfg.train.max_bad_steps, self.progress, self.ckpt.last_good)
        self.nonfinite.watch(trainable_parameters(self.model))
        self.n_params = numel(self.model.parameters())
        # Nothing is written before this point: bad input fails with output_dir untouched.
        self.ckpt.bind(self.engine, self.model, self, self._fingerprint(),
                       before_save=lambda: self.sink.check(self.ckpt.last_good()), after_adapter=self.sink.flush)
        self.ckpt.prepare(self.max_steps)
        self.sink.open(json.dumps(config_to_dict(cfg), indent=2) + "\n", resume_step)
        log.info("Propulsion on %d modules, %d trainable of %d parameters; %d steps",
                 len(self.targets), self.trainable, self.n_params, self.max_steps)
        if resume_step is not None:
            self.load_checkpoint()

    def _fingerprint(self) -> dict:
        if not self.ckpt.fingerprint:       # collective once (rank 0 hashes the data files), then kept
            self.ckpt.fingerprint = fingerprint(self.cfg, self.trainable, len(self.targets), self.world,
                                                self.tokenizer)
        return self.ckpt.fingerprint

    # ---------------------------------------------------------------- train
    def train(self) -> list[dict]:
        cfg, p = self.cfg, self.progress
        if p.step == 0 and self.data.eval is not None:
            self.evaluate_or_stop()
        self.sink.start_bar(self.max_steps, p.step)
        batches = micro_batches(self.data, cfg.train, self.rank, self.world, p, self.engine.device)
        try:
            while p.step < self.max_steps:
                start = time.perf_counter()
                sums = self.train_step(batches)                 # forward -> backward -> step
                totals = reduce_step(sums, self.stop.signum > 0, self.sink.error is not None,
                                     peak_memory_bytes(), self.rank, self.world)
                if totals.write_failed:
                    self.sink.raise_error(self.ckpt.last_good())
                p.step += 1
                p.tokens_seen += int(totals.sums.tokens)
                self.sink.log_step(self._step_record(totals.sums, time.perf_counter() - start),
                                   totals.peak_memory)
                if totals.stop:
                    self.ckpt.save(p.step, force=True)
                    raise Preempted(f"{self.stop.name()} received: checkpoint step_{p.step} written "
                                    f"under {self.ckpt.root}; resume with --resume")
                if p.step % cfg.eval.every_steps == 0 and self.data.eval is not None:
                    self.evaluate_or_stop()
                if p.step < self.max_steps:       # the last step saves after the final eval
                    self.ckpt.save(p.step)
        finally:
            self.sink.close_bar()
        if self.data.eval is not None and p.step % cfg.eval.every_steps != 0:
            self.evaluate_or_stop()
        self.ckpt.save(p.step, last_step=True)
        self.sink.check(self.ckpt.last_good())       # the last TensorBoard flush, too
        self.ckpt.finish(p.step)
        return self.sink.records

    def train_step(self, batches) -> WindowSums:
        """One applied optimizer update; this rank's sums over the window it used.

        Objective (docs/DESIGN.md "Training arithmetic"): the sum of per-token losses over every
        micro-batch of the window on every rank, divided by the window's target tokens on all
        ranks. DeepSpeed divides each backward by the accumulation steps and averages gradients
        over ranks, so each micro-batch's loss sum is multiplied by world * accum / n_window:
        any split of the same samples into ranks x micro-batch x accumulation gives one update.

        A micro-batch whose loss is not finite on some rank is dropped on every rank and the next
        one takes its place; the window's token count is taken again, so the objective stays exact
        when it is the window's first micro-batch (always, without accumulation). Later in a window
        the micro-batches already backpropagated keep the count they were scaled with.
        """
        accum = self.cfg.train.gradient_accumulation_steps
        while True:
            window = [next(batches) for _ in range(accum)]
            n_window = window_targets(window)
            sums = WindowSums()
            for i in range(accum):
                loss_sum = self.train_loss_sum(window[i])                       # forward
                while not self.nonfinite.loss_ok(loss_sum):    # a NaN would poison Adam: drop it
                    window[i] = next(batches)
                    n_window = window_targets(window)
                    loss_sum = self.train_loss_sum(window[i])
                self.engine.backward(loss_sum * (self.world * accum / max(n_window, 1.0)))   # backward
                if i < accum - 1:
                    self.engine.step()            # inside the window DeepSpeed only counts it
                else:
                    applied = self.ds.boundary_step(veto=self.nonfinite.grads_bad())     # step
                sums.add(loss_sum, window[i])
            if applied:
                self.nonfinite.update_applied()
                return sums
            # fp16: DeepSpeed's loss scaler owns overflow skips; they do not count as divergence.
            self.nonfinite.update_discarded(counts_as_bad=not self.ds.fp16)

    def train_loss_sum(self, batch: dict) -> torch.Tensor:
        """The training forward of one micro-batch (eval does not come here): the seam the
        fault-injection entry point (tests/fault_entry.py) wraps."""
        return forward_loss_sum(self.engine, batch)

    def _step_record(self, s: WindowSums, elapsed: float) -> dict:
        p = self.progress
        record = {"step": p.step, "loss": s.loss_sum / max(s.targets, 1.0), "lr": self.ds.lr,
                  "grad_norm": self.ds.grad_norm(), "tokens_per_s": s.tokens / elapsed,
                  "samples_per_s": s.rows / elapsed, "step_time_s": elapsed,
                  "skipped_batches": p.skipped_batches, "skipped_steps": p.skipped_steps}
        mfu = estimate_mfu(self.n_params, record["tokens_per_s"] / self.world, gpu_peak_flops())
        if mfu is not None:
            record["mfu"] = mfu
        return record

    # ---------------------------------------------------------------- eval
    def evaluate_or_stop(self) -> None:
        """Eval; a stop request on any rank during it (agreed on between eval batches) checkpoints
        this step and ends the run as preempted (exit 75) within one batch."""
        try:
            self.evaluate()
        except StopDuringEval:
            p = self.progress
            if p.step == 0:
                raise Preempted(f"{self.stop.name()} received during the eval before the first update: "
                                f"nothing trained, no checkpoint written; start the run again") from None
            self.ckpt.save(p.step, force=True)
            raise Preempted(f"{self.stop.name()} received during the eval at step {p.step}: checkpoint "
                            f"step_{p.step} written under {self.ckpt.root}; resume with --resume (that eval "
                            f"is not repeated)") from None

    @torch.no_grad()
    def evaluate(self) -> dict:
        ev, step = self.cfg.eval, self.progress.step
        self.engine.eval()
        loss_sum = n_sum = 0.0
        try:
            for batch, counted in eval_batches(self.data, self.cfg.train.micro_batch_size, self.rank, self.world,
                                               ev.max_batches, self.cfg.train.seed, self.engine.device):
                self.stop.check()                       # collective: every rank runs as many batches
                loss = float(forward_loss_sum(self.engine, batch))
                if counted:                             # else a repeat that keeps ZeRO-3 ranks in step
                    loss_sum += loss
                    n_sum += target_tokens(batch)
        finally:
            self.engine.train()
        loss_sum, n_sum = dist.all_reduce([loss_sum, n_sum])
        loss = loss_sum / max(n_sum, 1.0)
        record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        if ev.generate and self.data.eval_samples is not None:
            result = gen_eval.generation_eval(
                self.engine.module, self.tokenizer, self.data.eval_samples, ev, rank=self.rank,
                world_size=self.world, device=self.engine.device, zero3=self.ds.stage == 3,
                should_stop=self.stop.agreed)
            record.update(gen_eval.log_generation(self.sink.writer, result, step, run=self.sink.rank0))
            log.info("step %d eval accuracy %s (%d of %d)", step, result["accuracy"],
                     result["correct"], result["n"])
        if self.choice_questions is not None:
            # collective: every rank makes the same forwards; a stop request is agreed per batch
            result = score_questions(self.engine.module, self.tokenizer, self.choice_questions,
                                     answer_format=ev.answer_format, device=self.engine.device, rank=self.rank,
                                     world_size=self.world, should_stop=lambda: self.stop.signum > 0)
            if not result.complete:
                raise StopDuringEval(self.stop.name())
            record.update(choice_values(result))
            self.sink.scalars(choice_values(result), step)
            log.info("step %d eval choice accuracy %.4f (%d of %d)", step, result.accuracy, result.correct,
                     result.total)
        self.sink.record(record)
        self.sink.scalars({"eval/loss": loss, "eval/perplexity": record["eval_ppl"]}, step)
        log.info("step %d eval loss %.4f ppl %.2f", step, loss, record["eval_ppl"])
        per_layer, values = propulsion_stats(channel_scales(self.model, full_delta(self.model)))
        self.sink.log_propulsion(per_layer, values, step)
        return record

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Stateful: what a checkpoint keeps of the trainer (the engine keeps the rest)."""
        return self.progress.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)

    def load_checkpoint(self) -> None:
        self.ckpt.load()                        # collective; calls load_state_dict
        # What a resume may change takes effect from here: DeepSpeed restored the old values.
        previous = {k: old for k, (old, _) in self.ckpt.changes.items()}
        for change in self.ds.apply_settings(self.cfg.train, self.max_steps, self.progress.step, previous):
            log.info("step %d: %s", self.progress.step, change)
        self.sink.rewind(self.progress.step)
        self.sink.check(self.ckpt.last_good())  # collective: every rank stops if rank 0 could not

    def cleanup(self) -> None:
        if self.sink is not None:
            self.sink.close()
        self.ckpt.close()               # output_dir's lock, last


def run(cfg: RunConfig, overwrite: bool = False) -> list[dict]:
    trainer = Trainer(cfg, overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
