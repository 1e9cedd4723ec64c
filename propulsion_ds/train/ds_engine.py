"""The DeepSpeed engine around the frozen model, with the optimizer, the LR schedule and the update
veto it owns: built with our AdamW and LambdaLR so one veto can discard a non-finite update on
every ZeRO stage, and stepped at the boundary. The schedule: linear warm-up, then constant, linear
or cosine decay to zero.

The optimizer has two parameter groups: the Propulsion vectors, decayed by train.weight_decay,
and (with propulsion.train_bias) the pretrained biases, never decayed, since decay would pull
them toward 0 rather than toward their pretrained values. After a resume, the current config's
lr, weight_decay, max_grad_norm and schedule take effect from the resumed step
(``apply_settings``): DeepSpeed restores the checkpoint's own.
"""
from __future__ import annotations

import logging
import math
import types

import torch

from propulsion_ds.method.gather import trained_bias_params
from propulsion_ds.method.propulsion import trainable_parameters

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the schedule
def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    """f(s), the multiplier of train.lr for update s (0 first)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"train.schedule: unknown schedule {schedule!r}")
    return f


# ----------------------------------------------------------------------------- the update veto
class UpdateGuard:
    """Lets the trainer veto one optimizer update (and its LR-schedule step) on every rank alike."""

    def __init__(self):
        self.skip = False


def guarded_adamw(params, guard: UpdateGuard, **kw):
    # A plain AdamW (ZeRO accepts only known optimizer types) whose step the guard can veto.
    # The wrapper sits on the instance; state_dict() holds only param groups and tensors.
    opt = torch.optim.AdamW(params, **kw)
    unguarded = opt.step

    def step(self, *args, **kwargs):
        if guard.skip:
            return None
        return unguarded(*args, **kwargs)
    opt.step = types.MethodType(step, opt)    # bound, as LRScheduler's own step counter expects
    return opt


def guarded_lambda_lr(optimizer, schedule, guard: UpdateGuard):
    """LambdaLR whose step the guard can veto, except its own initial step.

    LambdaLR's constructor calls step() once to set update 0's LR to lr * f(0). The engine builds
    the scheduler while the guard vetoes DeepSpeed's set-up optimizer step; vetoing that initial
    step too would leave update 0 at the full base LR and the schedule one step late.
    """
    constructed = []   # in the closure: an instance attribute would land in state_dict()

    class GuardedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *args, **kwargs):
            if guard.skip and constructed:
                return None
            return super().step(*args, **kwargs)
    scheduler = GuardedLambdaLR(optimizer, schedule)
    constructed.append(True)
    return scheduler


# ----------------------------------------------------------------------------- the engine
def param_groups(model, weight_decay: float) -> list[dict]:
    """The vectors with ``weight_decay``; the trained biases (train_bias) in a group without decay."""
    bias_ids = {id(p) for _, p in trained_bias_params(model)}
    params = trainable_parameters(model)
    groups = [{"params": [p for p in params if id(p) not in bias_ids], "weight_decay": weight_decay}]
    biases = [p for p in params if id(p) in bias_ids]
    if biases:
        groups.append({"params": biases, "weight_decay": 0.0})
    return groups


class DSEngine:
    def __init__(self, model, ds_config: dict, train_cfg, max_steps: int):
        import deepspeed

        self.model = model
        self.guard = UpdateGuard()
        params = trainable_parameters(model)
        # Ours, never DeepSpeed's (config validation refuses an optimizer section): the guard can
        # then veto a non-finite update on every ZeRO stage.
        self.optimizer = guarded_adamw(param_groups(model, train_cfg.weight_decay), self.guard, lr=train_cfg.lr,
                                       weight_decay=train_cfg.weight_decay)
        schedule = lr_lambda(train_cfg.schedule, train_cfg.warmup_steps, max_steps)
        # ZeRO-0 with bf16/fp16 wraps the optimizer in FP16_UnfusedOptimizer, whose set-up runs
        # optimizer.step() on zero grads: Adam's step count would start one ahead. Veto it.
        self.guard.skip = True
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=self.optimizer, config=ds_config,
                lr_scheduler=lambda opt: guarded_lambda_lr(opt, schedule, self.guard))
        finally:
            self.guard.skip = False
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.fp16 = bool(ds_config.get("fp16", {}).get("enabled"))
        # ZeRO-0 in fp32 clips without keeping the norm (get_global_grad_norm() is None): measure
        # it ourselves at the boundary, where the gradients are already all-reduced.
        self._own_grad_norm = self.stage == 0 and not self.fp16 and not ds_config.get("bf16", {}).get("enabled")
        self._grad_norm = None
        self.lr = float(train_cfg.lr)

    def apply_settings(self, train_cfg, max_steps: int, step: int, previous: dict | None = None) -> list[str]:
        """After a checkpoint is loaded at ``step``: the current lr, weight_decay, max_grad_norm and
        schedule (over ``max_steps``) take effect from this update on, the next one's LR being
        lr * f(step) of the new schedule. DeepSpeed restored the checkpoint's param groups (their lr
        is the old schedule's last value, 0 at the end of a decay), the scheduler's base LR and,
        under ZeRO-1/2 and bf16, its clipping. Returns the changed values, as "train.lr 0.001 ->
        0.0001": the old value is ``previous``'s (the checkpoint's recorded settings) where given,
        else the restored one (ZeRO-3 and ZeRO-0 in fp32 clip with the current config's value)."""
        sched, groups, wrapper = self.engine.lr_scheduler, self.optimizer.param_groups, self.engine.optimizer
        new = {"train.lr": float(train_cfg.lr), "train.weight_decay": float(train_cfg.weight_decay),
               "train.max_grad_norm": float(train_cfg.max_grad_norm)}
        old = {"train.lr": float(sched.base_lrs[0]), "train.weight_decay": float(groups[0]["weight_decay"]),
               "train.max_grad_norm": float(getattr(wrapper, "clip_grad", new["train.max_grad_norm"]))}
        old.update({k: float(v) for k, v in (previous or {}).items() if k in old and v is not None})
        if hasattr(wrapper, "clip_grad"):
            wrapper.clip_grad = new["train.max_grad_norm"]
        schedule = lr_lambda(train_cfg.schedule, train_cfg.warmup_steps, max_steps)
        sched.lr_lambdas = [schedule] * len(groups)
        sched.base_lrs = [new["train.lr"]] * len(groups)
        sched.last_epoch = step             # one scheduler step per applied update
        for i, group in enumerate(groups):
            group["initial_lr"] = new["train.lr"]
            group["lr"] = new["train.lr"] * schedule(step)
            group["weight_decay"] = new["train.weight_decay"] if i == 0 else 0.0
        sched._last_lr = [group["lr"] for group in groups]
        self.lr = float(groups[0]["lr"])
        return [f"{k} {old[k]:g} -> {new[k]:g}" for k in new if old[k] != new[k]]

    def boundary_step(self, veto: bool) -> bool:
        """engine.step() at the accumulation boundary; whether the update was applied.

        Not applied: a rank saw a non-finite gradient (``veto``: our guard then stops AdamW and the
        schedule on every rank alike) or DeepSpeed skipped the step itself (fp16 overflow, ZeRO-3
        non-finite norm). The LR read here, before the step, is the one this update uses.
        """
        self.guard.skip = veto
        skipped_before = self.engine.skipped_steps
        if self._own_grad_norm:
            self._grad_norm = _grad_norm(self.model)
        self.lr = float(self.engine.get_lr()[0])
        try:
            self.engine.step()
        finally:
            self.guard.skip = False
        return not veto and self.engine.skipped_steps == skipped_before

    def grad_norm(self) -> float | None:
        if self._own_grad_norm:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)


def _grad_norm(model) -> float:
    grads = [p.grad.float().norm() for p in trainable_parameters(model) if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def log_partitioning(model) -> None:
    """Say how much of the model ZeRO-3 really partitions: tensors at or under
    stage3_param_persistence_threshold stay whole on every rank (a tiny model: all of them)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if not params:
        return
    # Persistent tensors keep a shard too, but are gathered once and kept whole on every rank.
    split = [p for p in params if not getattr(p, "ds_persist", False) and p.ds_tensor.numel() < p.ds_numel]
    log.info("ZeRO-3 partitioning: %d of %d parameter tensors partitioned; this rank holds %d of "
             "%d elements", len(split), len(params), sum(p.ds_tensor.numel() for p in params),
             sum(p.ds_numel for p in params))


def numel(params) -> int:
    """Elements of ``params``, counting a ZeRO-3 partitioned tensor whole."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def model_width(path: str, model_cfg) -> int | None:
    """hidden_size from the model's config: "auto" ZeRO buckets follow it (h*h, 0.9*h*h, 10*h), as
    the memory planner assumes; without it DeepSpeed's 5e8-element defaults cost ~1 GB per GPU."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(h) if h else None
