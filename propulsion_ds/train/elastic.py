"""The trainable state in a form that does not depend on the world size: what elastic resume loads.

DeepSpeed's own checkpoint files hold each rank's partition of the fp32 master vectors and of
Adam's moments, laid out for the world size that wrote them. Next to them every checkpoint holds
``elastic.safetensors``: each trainable tensor whole (fp32), its ``exp_avg`` and ``exp_avg_sq``
whole, and (in the file's metadata) Adam's step count and the trainer's state (the data position
as a count of global samples). The trainable state is the Propulsion vectors (and the biases with
``train_bias``): a few MB even at 70B.

A resume on another number of ranks, or with another micro-batch x accumulation split of the same
global batch, loads this file instead of DeepSpeed's per-rank files: each rank writes its own
partition of every tensor into DeepSpeed's fp32 master and optimizer state (ZeRO-1/2/3, the bf16
optimizer) or into the parameter and AdamW's state directly (ZeRO-0), and the working copy of the
parameter (bf16/fp16, or the ZeRO-3 partition the forward gathers) follows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from propulsion_ds.errors import CheckpointError
from propulsion_ds.method.gather import gathered
from propulsion_ds.method.propulsion import trainable_parameters

FILE = "elastic.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    ids = {id(p) for p in trainable_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _managed(p) -> bool:
    """Whether DeepSpeed keeps an fp32 master of ``p`` elsewhere (ZeRO-1/2/3, bf16 optimizer)."""
    return hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None


def _shape(p) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def gather(engine, model, trainer_state: dict) -> tuple[dict, dict]:
    """Collective: (tensors, metadata) of the world-size-independent state, on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    tensors = {}
    for name, p in named_trainable(model):
        if _managed(p):
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            value = p.detach()
            state = base.state.get(p, {})
            moments = {k: state.get(k) for k in MOMENTS}
        tensors[name] = value.float().cpu().reshape(_shape(p)).contiguous()
        for k, m in moments.items():
            if m is not None:                 # no update applied yet: Adam has no moments
                tensors[f"{name}::{k}"] = m.float().cpu().reshape(_shape(p)).contiguous()
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    meta = {"adam_step": max(steps) if steps else 0.0, "trainer": trainer_state}
    return tensors, {"state": json.dumps(meta)}


def write(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def read(path: Path) -> tuple[dict, dict]:
    """(tensors, state) of an elastic.safetensors file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {Path(path).parent} holds no {FILE} (written before elastic resume "
                              f"existed): resume it with the world size and split that wrote it")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            state = json.loads((f.metadata() or {})["state"])
    except Exception as e:  # noqa: BLE001 - safetensors and json report in their own types
        raise CheckpointError(f"{path}: unreadable elastic state ({' '.join(str(e).split())[:200]})") from None
    return tensors, state


def load(engine, model, tensors: dict, state: dict) -> dict:
    """Collective: set every trainable tensor and its Adam state from whole tensors; returns the
    trainer state. Each rank keeps its own partition; DeepSpeed's counters follow the step."""
    params = named_trainable(model)
    missing = [n for n, _ in params if n not in tensors]
    if missing:
        raise CheckpointError(f"elastic state lacks {missing[0]}: not written for this model and method")
    if state["adam_step"] > 0 and any(f"{n}::{MOMENTS[0]}" not in tensors for n, _ in params):
        # fp16 without ZeRO keeps Adam's state on fp32 copies this file could not reach
        raise CheckpointError("elastic state without Adam's moments (written under fp16 without ZeRO): "
                              "resume with the world size and split that wrote the checkpoint")
    base = _base_optimizer(engine)
    _ensure_adam_state(engine.optimizer, base)
    for name, p in params:
        value = tensors[name].float()
        _set_master(p, value, None)
        for k in MOMENTS:
            if f"{name}::{k}" in tensors:
                _set_master(p, tensors[f"{name}::{k}"].float(), k, base)
        _set_working_copy(p, value)
    step = state["adam_step"]
    for s in base.state.values():
        if "step" in s:
            s["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(s["step"]) else step
    trainer = state["trainer"]
    engine.global_steps = int(trainer.get("step", 0))
    return trainer


def _ensure_adam_state(wrapper, base) -> None:
    """AdamW creates its state at its first step; DeepSpeed's set-up step was vetoed: create it.
    ZeRO-3 hands AdamW its flat fp32 groups only for the step: they are named here directly."""
    tensors = [q for group in base.param_groups for q in group["params"]]
    tensors += list(getattr(wrapper, "fp32_partitioned_groups_flat", None) or [])
    for q in tensors:
        s = base.state[q]
        if "exp_avg" not in s:
            s["step"] = torch.tensor(0.0)
            s["exp_avg"] = torch.zeros_like(q, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)


def _set_master(p, value: torch.Tensor, key: str | None, base=None) -> None:
    if hasattr(p, "ds_id"):                              # ZeRO-3: this rank's slice of the flat fp32 group
        opt = p._z3_optimizer
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        n = part.numel()
        flat = value.flatten()[opt._get_param_partition_rank(p) * n:][:n]
        part.data[:flat.numel()].copy_(flat.to(part.device))
    elif getattr(p, "_hp_mapping", None) is not None:    # ZeRO-1/2, bf16 optimizer
        # Written at the fragment's address in the flat fp32 partition's state: before the first
        # update DeepSpeed has not linked the optimizer-state fragments (set_full_hp_param fails).
        m = p._hp_mapping
        if m.hp_fragment_address.numel == 0:
            return
        flat = _owner(base, m.hp_fragment) if key is not None else None
        dest = m.hp_fragment if key is None else base.state[flat][key].narrow(
            0, m.hp_fragment_address.start, m.hp_fragment_address.numel)
        dest.data.copy_(value.flatten().narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel))
    elif key is None:                                    # ZeRO-0: the parameter is the master
        with torch.no_grad():
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
    else:
        base.state[p][key].copy_(value.reshape(p.shape))


def _owner(base, fragment: torch.Tensor) -> torch.Tensor:
    """The optimizer's flat fp32 tensor that ``fragment`` (a view) lies in."""
    ptr = fragment.data_ptr()
    for group in base.param_groups:
        for q in group["params"]:
            if q.data_ptr() <= ptr < q.data_ptr() + q.numel() * q.element_size():
                return q
    raise CheckpointError("elastic resume: DeepSpeed's fp32 partition of a trainable tensor was not found")


def _set_working_copy(p, value: torch.Tensor) -> None:
    """The copy the forward reads: ZeRO-3 repartitions rank 0's whole tensor; ZeRO-1/2 keep it whole."""
    if hasattr(p, "ds_id"):
        import torch.distributed as tdist

        with gathered([p], modifier_rank=0), torch.no_grad():
            if not tdist.is_initialized() or tdist.get_rank() == 0:
                p.data.copy_(value.reshape(p.shape).to(p.dtype))
    elif getattr(p, "_hp_mapping", None) is not None:
        with torch.no_grad():
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
