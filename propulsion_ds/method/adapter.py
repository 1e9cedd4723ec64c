"""Adapter files: the trained z of every target, as safetensors + a JSON description.

``propulsion.safetensors`` holds, all fp32:

- ``<module>.propulsion``: z = 1 + delta of that target, shape (d_out,), or (n, d_out) when
  ``num_vectors = n > 1`` (the model's scale is mean_i z_i**k);
- ``<module>.bias``: only with ``train_bias = true``, the trained bias of every target that has
  one, under the base model's own state_dict key (so ``model.load_state_dict(sd, strict=False)``
  also takes it). Where DeepSpeed keeps an fp32 master copy (``trained_biases`` on every rank)
  that copy is saved; otherwise the model's own value, upcast exactly to fp32. A merged model
  holds ``z**k * trained_bias``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from propulsion_ds.method.propulsion import DELTA_NAME, PropulsionConfig, _require_state, get_state, inject
from propulsion_ds.errors import AdapterError  # noqa: F401

WEIGHTS_FILE = "propulsion.safetensors"
CONFIG_FILE = "propulsion_config.json"
FORMAT_VERSION = 1
KEY_SUFFIX = ".propulsion"
BIAS_SUFFIX = ".bias"



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


def adapter_state_dict(model: nn.Module, delta: torch.Tensor | None = None,
                       biases: dict | None = None) -> dict:
    """{"<module>.propulsion": fp32 z} on CPU; shape (d_out,) or (n, d_out) if num_vectors > 1;
    plus {"<module>.bias": fp32 trained bias} with ``train_bias``.

    ``delta`` overrides the model's own tensor, e.g. DeepSpeed's fp32 master copy; ``biases``
    (from ``trained_biases``) the model's biases. Without ``delta`` this is collective under
    ZeRO-3 (every rank calls it); with ``delta`` it runs no collective (rank 0 may call it alone),
    so partitioned biases must then come through ``biases``.
    """
    state = _require_state(model)
    param = getattr(model, DELTA_NAME)
    with gathered([param] if delta is None else []):
        full = (param if delta is None else delta).detach().float().cpu()
        z = 1.0 + full.reshape(state.config.num_vectors, -1)
    out = {}
    for s in state.slots:
        v = z[:, s.offset:s.offset + s.size].clone()
        out[s.name + KEY_SUFFIX] = v[0] if state.config.num_vectors == 1 else v
    if biases is None:
        biases = trained_biases(model) if delta is None else _local_biases(model)
    expected = {n + BIAS_SUFFIX: _full_shape(b) for n, b in trained_bias_params(model)}
    if set(biases) != set(expected):
        raise AdapterError(f"biases= holds {sorted(biases)[:3]}..., the model trains {sorted(expected)[:3]}...")
    for k, shape in expected.items():
        out[k] = biases[k].detach().float().cpu().reshape(shape)
    return out


def _expected_shapes(model) -> dict:
    state = _require_state(model)
    n = state.config.num_vectors
    shapes = {s.name + KEY_SUFFIX: ((s.size,) if n == 1 else (n, s.size)) for s in state.slots}
    shapes.update({name + BIAS_SUFFIX: _full_shape(b) for name, b in trained_bias_params(model)})
    return shapes


def load_adapter_state_dict(model: nn.Module, sd: dict) -> None:
    """Strict load of z values; a missing/unexpected key or wrong shape names the key."""
    state = _require_state(model)
    expected = _expected_shapes(model)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing and all(k.endswith(BIAS_SUFFIX) for k in missing) and \
            not any(k.endswith(BIAS_SUFFIX) for k in sd):
        raise AdapterError(f"adapter was trained with train_bias=true but holds no biases (key "
                           f"{missing[0]!r}): it was written before propulsion_ds saved them, and "
                           f"its trained biases are lost")
    if missing:
        raise AdapterError(f"adapter is missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise AdapterError(f"adapter has unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise AdapterError(f"adapter key {k!r} has shape {tuple(sd[k].shape)}, model expects {shape}")
    n = state.config.num_vectors
    param = getattr(model, DELTA_NAME)
    with gathered([param], modifier_rank=0), torch.no_grad():
        for s in state.slots:
            z = sd[s.name + KEY_SUFFIX].float().reshape(n, s.size)
            param[:, s.offset:s.offset + s.size].copy_((z - 1.0).to(param.dtype))
    for name, bias in trained_bias_params(model):
        with gathered([bias], modifier_rank=0), torch.no_grad():
            bias.copy_(sd[name + BIAS_SUFFIX].to(bias.dtype))


def _base_description(model) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "base_model": getattr(cfg, "_name_or_path", "") or "",
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
    }


def _is_main_rank() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _atomic_write(path: Path, write) -> None:
    """Write to ``<name>.tmp``, fsync, rename over ``path``: readers see the old file or the new
    one, never a torn one; a failed write (disk full) removes the temp file and keeps the old."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory, delta: torch.Tensor | None = None,
                 biases: dict | None = None) -> Path:
    """Write propulsion.safetensors and propulsion_config.json (only rank 0 writes).

    Without ``delta`` every rank calls it (ZeRO-3 gathers). With ``delta`` (DeepSpeed's fp32
    master, gathered by the caller) it runs no collective and may run on rank 0 alone; with
    ``train_bias`` under ZeRO-3 pass ``biases=trained_biases(model)`` (gathered on every rank) too.
    """
    from safetensors.torch import save_file

    state = _require_state(model)
    sd = adapter_state_dict(model, delta, biases)
    directory = Path(directory)
    if _is_main_rank():
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "propulsion": state.config.to_dict(),
            **_base_description(model),
            "trainable_count": state.trainable_count,
            "targets": {s.name: s.size for s in state.slots},
            "biases": {k[:-len(BIAS_SUFFIX)]: sd[k].numel() for k in sd if k.endswith(BIAS_SUFFIX)},
        }
        _atomic_write(directory / WEIGHTS_FILE,
                      lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, str(p),
                                          metadata={"format": "pt", "format_version": str(FORMAT_VERSION)}))
        _atomic_write(directory / CONFIG_FILE,
                      lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_adapter_config(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: not a propulsion adapter directory")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("propulsion"), dict) \
            or not isinstance(meta.get("targets"), dict):
        raise AdapterError(f"{path} lacks 'propulsion' and 'targets': not a propulsion adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {meta.get('format_version')!r}; "
                           f"this propulsion_ds reads version {FORMAT_VERSION}")
    return meta


def read_adapter_weights(directory) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is truncated or corrupted ({e})") from None


def check_compatible(model: nn.Module, meta: dict, where="adapter") -> None:
    arch = type(model).__name__
    if meta.get("architecture") != arch:
        raise AdapterError(f"{where} was made for {meta.get('architecture')}, this model is {arch}")
    state = _require_state(model)
    ours = {s.name: s.size for s in state.slots}
    theirs = meta["targets"]
    for name, size in theirs.items():
        if name not in ours:
            raise AdapterError(f"{where} targets module {name!r}, which this model does not have "
                               f"(or which this injection does not target)")
        if ours[name] != size:
            raise AdapterError(f"{where} module {name!r} has {size} channels, this model's has {ours[name]}: "
                               f"the adapter was made for a model of other sizes")
    extra = [n for n in ours if n not in theirs]
    if extra:
        raise AdapterError(f"model targets {extra[0]!r}, which the {where} does not contain")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Inject (if not yet) with the adapter's config and load its z values."""
    meta = read_adapter_config(directory)
    try:
        config = PropulsionConfig(**meta["propulsion"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{Path(directory) / CONFIG_FILE}: bad 'propulsion' section ({e})") from None
    arch = type(model).__name__
    if meta.get("architecture") != arch:
        raise AdapterError(f"adapter was made for {meta.get('architecture')}, this model is {arch}")
    state = get_state(model)
    if state is not None and state.config != config:
        raise AdapterError(f"model already carries Propulsion {state.config.to_dict()}, "
                           f"adapter was trained with {config.to_dict()}")
    weights = read_adapter_weights(directory)  # before inject: an unreadable file leaves the model as it was
    if state is None:
        inject(model, config)
    check_compatible(model, meta)
    load_adapter_state_dict(model, weights)
    return model


def meta_skeleton(base, trust_remote_code: bool = False) -> nn.Module:
    """The base model's skeleton on the meta device, from its config.json alone (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"cannot read the base model's config from {str(base)!r} ({first})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def injected_skeleton(base, meta: dict, pcfg, trust_remote_code: bool = False) -> nn.Module:
    """``meta_skeleton(base)`` with the adapter's Propulsion injected, checked against ``meta``
    (architecture, target names and sizes): what the offline merge and the exports plan from."""
    from propulsion_ds.method.propulsion import inject

    model = meta_skeleton(base, trust_remote_code)
    arch = type(model).__name__
    if meta.get("architecture") != arch:
        raise AdapterError(f"adapter was made for {meta.get('architecture')}, the base model {base} is {arch}")
    try:
        inject(model, pcfg)
    except ValueError as e:
        raise AdapterError(f"adapter's targets do not fit {base}: {e}") from None
    check_compatible(model, meta)
    return model
