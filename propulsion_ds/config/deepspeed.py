"""The run's DeepSpeed config: loaded (file or inline), checked, each ``"auto"`` filled from the
run config as the Hugging Face DeepSpeed integration fills them."""
from __future__ import annotations

import copy
from typing import Any

from propulsion_ds.config.jsonfile import read_json
from propulsion_ds.config.messages import fail, got, is_int, show
from propulsion_ds.config.schema import RunConfig

# DeepSpeed prints a line every steps_per_print steps; the trainer logs its own metrics.
QUIET_STEPS_PER_PRINT = 1_000_000_000
ZERO_DEFAULT_BUCKET = 500_000_000
ZERO_DEFAULT_PERSISTENCE = 100_000


def load_deepspeed(value: Any) -> dict:
    """The DeepSpeed config dict named by ``deepspeed`` (a JSON path or an inline dict), copied."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    ds = read_json(value, "deepspeed")
    if not isinstance(ds, dict):
        fail(f"deepspeed: {value!r} must hold a JSON object, {got(ds)}")
    return ds


def _check_offload(zero: dict, stage: int) -> None:
    for what, stages, need in (("offload_param", (3,), "stage 3"),
                               ("offload_optimizer", (1, 2, 3), "stage 1, 2 or 3")):
        off = zero.get(what)
        if off is None:
            continue
        path = f"deepspeed.zero_optimization.{what}"
        if not isinstance(off, dict):
            fail(f"{path}: expected an object, {got(off)}")
        device = off.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            fail(f"{path}.device: expected one of none, cpu, nvme, got {show(device)}")
        if device != "none" and stage not in stages:
            fail(f"{path}: offloading to {device} needs ZeRO {need}, "
                 f"but deepspeed.zero_optimization.stage is {stage}")
        if device == "nvme" and not off.get("nvme_path"):
            fail(f"{path}.nvme_path: required when {path}.device is 'nvme'")


def check_deepspeed(ds: dict) -> None:
    """Structure and ZeRO contradictions of a DeepSpeed config dict."""
    zero = ds.get("zero_optimization", {})
    if zero is None:
        zero = {}
    if not isinstance(zero, dict):
        fail(f"deepspeed.zero_optimization: expected an object, {got(zero)}")
    stage = zero.get("stage", 0)
    if not is_int(stage) or stage not in (0, 1, 2, 3):
        fail(f"deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got {show(stage)}")
    _check_offload(zero, stage)
    for key in ("bf16", "bfloat16", "fp16"):
        if key in ds and not isinstance(ds[key], dict):
            fail(f"deepspeed.{key}: expected an object, {got(ds[key])}")
    # The trainer builds AdamW and the LR schedule itself (train.lr, weight_decay, warmup_steps,
    # schedule): that is what lets it veto a non-finite update on every rank and log the LR each
    # update used. A DeepSpeed section would silently compete with them.
    if "optimizer" in ds:
        fail("deepspeed.optimizer: not supported, the trainer builds AdamW from train.lr and "
             "train.weight_decay; remove the section")
    if "scheduler" in ds:
        fail("deepspeed.scheduler: not supported, the LR schedule comes from train.schedule and "
             "train.warmup_steps; remove the section")


def _fill(container: dict, key: str, value: Any, path: str, run_field: str | None,
          missing: bool = False) -> None:
    """Fill an "auto" (and, with ``missing``, an absent key); an explicit value must agree with
    the run config's (``run_field``)."""
    if key not in container:
        if missing:
            container[key] = value
        return
    current = container[key]
    if current == "auto":
        container[key] = value
    elif run_field is not None and current != value:
        fail(f"{path}: is {show(current)} but {run_field} gives {show(value)}; "
             f"set it to \"auto\" or make the two agree")


def _fill_batch(ds: dict, cfg: RunConfig, world_size: int | None) -> None:
    t = cfg.train
    micro, accum = t.micro_batch_size, t.gradient_accumulation_steps
    # Absent batch keys are filled like "auto": DeepSpeed would otherwise assert on a minimal
    # {"zero_optimization": {"stage": 3}} section.
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "deepspeed.train_micro_batch_size_per_gpu",
          "train.micro_batch_size", missing=True)
    _fill(ds, "gradient_accumulation_steps", accum, "deepspeed.gradient_accumulation_steps",
          "train.gradient_accumulation_steps", missing=True)
    # Without a world size (the dry run at load time) only an "auto" is filled, and not checked.
    _fill(ds, "train_batch_size", micro * accum * (world_size or 1), "deepspeed.train_batch_size",
          None if world_size is None else
          f"train.micro_batch_size * train.gradient_accumulation_steps * world_size {world_size}",
          missing=world_size is not None)
    _fill(ds, "gradient_clipping", t.max_grad_norm, "deepspeed.gradient_clipping", "train.max_grad_norm",
          missing=True)


def _fill_dtype(ds: dict, dtype: str) -> None:
    for key, alias in (("bf16", "bfloat16"), ("fp16", None)):
        want = dtype == key
        name = key if key in ds or alias not in ds else alias
        section = ds.get(name)
        if section is None:
            if want:
                ds[name] = {"enabled": True}
            continue
        enabled = section.setdefault("enabled", False)
        if enabled == "auto":
            section["enabled"] = want
        elif enabled is not want:
            fail(f"deepspeed.{name}.enabled: is {show(enabled)} but model.dtype is {dtype!r}; "
                 f"set it to \"auto\" or make the two agree")
    if ds.get("bf16", ds.get("bfloat16", {})).get("enabled") is True and \
            ds.get("fp16", {}).get("enabled") is True:
        fail("deepspeed: bf16.enabled and fp16.enabled are both true")


def _fill_buckets(zero: dict, h: int | None) -> None:
    for key, value in (
            ("reduce_bucket_size", h * h if h else ZERO_DEFAULT_BUCKET),
            ("stage3_prefetch_bucket_size", int(0.9 * h * h) if h else ZERO_DEFAULT_BUCKET),
            ("stage3_param_persistence_threshold", 10 * h if h else ZERO_DEFAULT_PERSISTENCE)):
        _fill(zero, key, value, f"deepspeed.zero_optimization.{key}", None)


def _no_auto_left(node: Any, path: str) -> None:
    if node == "auto" and isinstance(node, str):
        fail(f"{path}: \"auto\" has no value to take from the run config; set it explicitly")
    if isinstance(node, dict):
        for key, value in node.items():
            _no_auto_left(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _no_auto_left(value, f"{path}[{i}]")


def fill_deepspeed(cfg: RunConfig, ds: dict, world_size: int | None, hidden_size: int | None) -> dict:
    """``ds`` checked and filled in place (``world_size`` None: the load-time dry run)."""
    check_deepspeed(ds)
    _fill_batch(ds, cfg, world_size)
    _fill_dtype(ds, cfg.model.dtype)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        _fill_buckets(zero, hidden_size)
    ds.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    _no_auto_left(ds, "deepspeed")
    return ds


def resolve_deepspeed(cfg: RunConfig, world_size: int, hidden_size: int | None = None, *,
                      total_steps: int | None = None) -> dict:
    """The DeepSpeed config for this run: loaded (file or inline), deep-copied, autos filled.

    Fills as the Hugging Face integration does: micro batch, accumulation, train_batch_size
    (micro * accum * world_size), gradient_clipping (absent keys too), bf16/fp16.enabled from
    model.dtype (a missing bf16/fp16 section is added when the dtype needs it), and ZeRO bucket
    sizes from ``hidden_size`` (h*h, 0.9*h*h, 10*h, as the memory planner assumes) or fixed
    defaults. Explicit values that contradict the run config, any "auto" left over, and an
    ``optimizer`` or ``scheduler`` section raise ConfigError. Adds a quiet ``steps_per_print``.
    ``total_steps`` is accepted for callers that know the run length; nothing needs it now.
    """
    del total_steps                             # kept in the signature: the recipe passes it
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if hidden_size is not None and (not is_int(hidden_size) or hidden_size < 1):
        raise ValueError(f"hidden_size must be an integer >= 1 or None, got {hidden_size!r}")
    return fill_deepspeed(cfg, load_deepspeed(cfg.deepspeed), world_size, hidden_size)
