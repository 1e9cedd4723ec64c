"""What the offline merge will do, decided before a weight is read: which checkpoint tensors to
scale, along which axis, by which scale, and what untying a tied lm_head adds.

Module types come from the model built on the ``meta`` device from the base ``config.json``
(``compat.injected_skeleton``); the tensor of module ``a.b.c`` is ``a.b.c.weight``. The scales are
``propulsion.channel_scales`` of the delta the adapter file holds (``adapter.adapter_delta``): the
very values the training hook multiplied by.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from propulsion_ds.errors import AdapterError, MergeError
from propulsion_ds.method.gather import BIAS_SUFFIX, trained_bias_params
from propulsion_ds.method.adapter import (adapter_config, adapter_delta, read_adapter_config,
                                          read_adapter_weights)
from propulsion_ds.method.compat import injected_skeleton
from propulsion_ds.method.propulsion import channel_scales, get_state, scaled_tied_pair
from propulsion_ds.method.targets import weight_axis

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Scale:
    key: str                 # the tensor in the checkpoint
    scale: torch.Tensor      # fp32, (d_out,)
    axis: int                # the output-channel axis of that tensor
    replace: torch.Tensor | None = None   # the adapter's trained bias, folded instead of the stored one


@dataclass
class _Plan:
    scales: dict             # checkpoint key -> Scale
    untie_from: str | None   # embedding key to copy into the new lm_head key
    untie_to: str | None
    untie_scale: Scale | None = None
    untie_config: bool = False   # set tie_word_embeddings false in the output config


def read_header(path: Path) -> dict:
    """{key: (shape, dtype)} of one safetensors file, reading its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_files(base: Path) -> tuple[list[Path], dict | None]:
    """The base model's shards in order, and its index (None for a single file)."""
    index_path = base / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise MergeError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise MergeError(f"{index_path} names shard {missing[0]!r}, which is not in {base}")
        return [base / n for n in sorted(names)], index
    if (base / SINGLE_FILE).is_file():
        return [base / SINGLE_FILE], None
    if any(base.glob("*.bin")) or any(base.glob("*.pt")):
        raise MergeError(f"{base} holds PyTorch .bin weights; only safetensors checkpoints are "
                         f"merged (re-save the model with save_pretrained(safe_serialization=True))")
    raise MergeError(f"{base} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors model directory")


def _find_key(name: str, suffix: str, keys, prefix: str) -> str | None:
    """The checkpoint key of ``name.suffix``; tolerates a checkpoint saved with/without the
    model's base_model_prefix (e.g. GPT-2's "h.0..." vs "transformer.h.0...")."""
    candidates = [f"{name}.{suffix}"]
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.{suffix}")
        else:
            candidates.append(f"{prefix}.{name}.{suffix}")
    return next((c for c in candidates if c in keys), None)


def _trained_biases(model, weights: dict) -> dict:
    """{module: fp32 trained bias}; refuses an adapter trained with train_bias that holds none
    (checked before the general key check, for the message that says what merging would lose)."""
    want = [name for name, _ in trained_bias_params(model)]
    missing = [n for n in want if n + BIAS_SUFFIX not in weights]
    if missing:
        raise AdapterError(f"adapter was trained with train_bias=true but holds no trained bias "
                           f"{missing[0] + BIAS_SUFFIX!r}: it was written before propulsion_ds "
                           f"saved biases, so merging it would drop them")
    return {n: weights[n + BIAS_SUFFIX].float() for n in want}


def _plan_untie(model, plan: _Plan, scales: dict, keys, prefix: str, untie: bool) -> str | None:
    """A tied input embedding / lm_head pair: one tensor in the checkpoint, two roles. Fills the
    untie fields of ``plan``; returns the lm_head's module name when its weight is written from
    the embedding (so it is not scaled in place as well)."""
    pair = scaled_tied_pair(model)
    if pair is None:
        return None
    if not untie:
        raise MergeError(
            "the input embedding and lm_head share one weight (tie_word_embeddings) and "
            "the adapter scales one of them: merging would change both. Pass --untie to "
            "write a separate lm_head weight")
    emb_name, head_name = pair
    plan.untie_config = True
    if _find_key(head_name, "weight", keys, prefix) is not None:   # an unusual checkpoint storing both
        return None
    emb_key = _find_key(emb_name, "weight", keys, prefix)
    if emb_key is None:
        raise MergeError(f"the base checkpoint has no tensor {emb_name}.weight")
    plan.untie_from, plan.untie_to = emb_key, f"{head_name}.weight"
    if head_name in scales:
        plan.untie_scale = Scale(plan.untie_to, scales[head_name], 0)
    return head_name


def _tensor_scale(slot, module, suffix: str, headers: dict, prefix: str, scale, bias) -> Scale:
    """The Scale of one target's weight or bias, checked against the checkpoint's header."""
    key = _find_key(slot.name, suffix, headers, prefix)
    if key is None:
        raise MergeError(f"the base checkpoint has no tensor {slot.name}.{suffix} for "
                         f"adapter target {slot.name!r}")
    shape = headers[key][0]
    ax = weight_axis(module) if suffix == "weight" else 0
    if len(shape) <= max(ax, 0) or shape[ax] != slot.size:
        raise MergeError(f"base tensor {key!r} has shape {list(shape)}, adapter target "
                         f"{slot.name!r} has {slot.size} channels: the adapter was made "
                         f"for another model")
    if bias is not None and tuple(bias.shape) != tuple(shape):
        raise AdapterError(f"adapter key {slot.name + BIAS_SUFFIX!r} has shape "
                           f"{tuple(bias.shape)}, base tensor {key!r} has {tuple(shape)}")
    return Scale(key, scale, ax, bias)


def plan_merge(base: Path, adapter: Path, headers: dict, *, untie: bool,
               trust_remote_code: bool = False) -> _Plan:
    """Which tensors to scale, along which axis, and what untying adds. Reads no base weights."""
    meta = read_adapter_config(adapter)
    model = injected_skeleton(base, meta, adapter_config(meta, adapter), trust_remote_code)
    weights = read_adapter_weights(adapter)
    biases = _trained_biases(model, weights)
    scales = channel_scales(model, adapter_delta(model, weights))
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan = _Plan({}, None, None)
    from_embedding = _plan_untie(model, plan, scales, set(headers), prefix, untie)
    modules = dict(model.named_modules())
    for slot in get_state(model).slots:
        module = modules[slot.name]
        if slot.name != from_embedding:       # else written from the embedding, see untie_scale
            s = _tensor_scale(slot, module, "weight", headers, prefix, scales[slot.name], None)
            plan.scales[s.key] = s
        if getattr(module, "bias", None) is not None:
            s = _tensor_scale(slot, module, "bias", headers, prefix, scales[slot.name], biases.get(slot.name))
            plan.scales[s.key] = s
    return plan
