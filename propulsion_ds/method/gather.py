"""Reading trained tensors off a model that DeepSpeed may hold: ZeRO-3 gathers, fp32 master copies.

What the adapter saves is the delta and, with ``train_bias``, the targets' biases; under ZeRO-3
they are partitioned across ranks, and under bf16/fp16 DeepSpeed keeps an fp32 master copy that
is the value training really holds. These helpers return whole fp32 tensors either way.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from propulsion_ds.errors import AdapterError
from propulsion_ds.method.propulsion import _require_state

BIAS_SUFFIX = ".bias"      # adapter key of a trained bias: the base model's own state_dict key


def gathered(params, modifier_rank=None):
    """Gather ZeRO-3 partitioned params for the block (a no-op for ordinary tensors)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def trained_bias_params(model: nn.Module) -> list:
    """[(target name, bias parameter)] that train with ``train_bias`` (targets that have a bias)."""
    state = _require_state(model)
    if not state.config.train_bias:
        return []
    modules = dict(model.named_modules())
    return [(s.name, modules[s.name].bias) for s in state.slots
            if getattr(modules[s.name], "bias", None) is not None]


def _full_shape(p: torch.Tensor) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and p.numel() != math.prod(_full_shape(p))


def _fp32_master(p: torch.Tensor):
    """DeepSpeed's fp32 master copy of ``p`` (a collective), or None where it keeps none."""
    if not (hasattr(p, "_z3_optimizer") or hasattr(p, "_hp_mapping")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def trained_biases(model: nn.Module) -> dict:
    """{"<module>.bias": fp32 CPU tensor} of every trained bias; {} without ``train_bias``.

    Collective under DeepSpeed (ZeRO-3 gathers, the fp32 master copy is assembled): EVERY rank
    must call it, in the same order, e.g. next to the delta's own gather. Pass the result to
    ``save_adapter(..., biases=...)`` on rank 0.
    """
    out = {}
    for name, bias in trained_bias_params(model):
        full = _fp32_master(bias)
        if full is None:
            with gathered([bias]):
                full = bias.detach().float().clone()
        out[name + BIAS_SUFFIX] = full.detach().float().cpu().reshape(_full_shape(bias))
    return out


def _local_biases(model: nn.Module) -> dict:
    """The trained biases as this rank holds them, no collective (refuses partitioned ones)."""
    out = {}
    for name, bias in trained_bias_params(model):
        if _partitioned(bias):
            raise AdapterError(
                f"train_bias: {name}.bias is partitioned (ZeRO-3); gather the biases on every rank "
                f"with propulsion_ds.method.adapter.trained_biases(model) and pass save_adapter(..., biases=...)")
        out[name + BIAS_SUFFIX] = bias.detach().float().cpu().clone()
    return out
