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

import json
from pathlib import Path

import torch
from torch import nn

from propulsion_ds.errors import AdapterError
from propulsion_ds.fsutil import write_atomic
from propulsion_ds.method.compat import check_architecture, check_compatible
from propulsion_ds.method.gather import (BIAS_SUFFIX, _full_shape, _local_biases, gathered,
                                         trained_bias_params, trained_biases)
from propulsion_ds.method.propulsion import DELTA_NAME, PropulsionConfig, _require_state, get_state, inject

WEIGHTS_FILE = "propulsion.safetensors"
CONFIG_FILE = "propulsion_config.json"
FORMAT_VERSION = 1
KEY_SUFFIX = ".propulsion"


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


def check_adapter_weights(model: nn.Module, sd: dict) -> None:
    """An adapter's tensors hold exactly what ``model``'s injection needs; a missing/unexpected key
    or a wrong shape names the key."""
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


def adapter_delta(model: nn.Module, sd: dict) -> torch.Tensor:
    """The fp32 delta (n, total_d_out) = z - 1 that an adapter's tensors ``sd`` hold (checked).

    z - 1 is exact in fp32 for z in [0.5, 2] (Sterbenz) and 1 + (z - 1) == z, so
    ``channel_scales(model, adapter_delta(model, sd))`` is the scale training computed.
    """
    state = _require_state(model)
    check_adapter_weights(model, sd)
    n = state.config.num_vectors
    return torch.cat([sd[s.name + KEY_SUFFIX].float().reshape(n, s.size) - 1.0 for s in state.slots], dim=1)


def load_adapter_state_dict(model: nn.Module, sd: dict) -> None:
    """Strict load of z values (and trained biases); a missing/unexpected key or wrong shape names the key."""
    delta = adapter_delta(model, sd)
    param = getattr(model, DELTA_NAME)
    with gathered([param], modifier_rank=0), torch.no_grad():
        param.copy_(delta.to(param.dtype))
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
    """``fsutil.write_atomic`` through ``<name>.tmp`` (the temp name the adapter always used):
    readers see the old file or the new one, never a torn one."""
    write_atomic(path, write, tmp=path.with_name(path.name + ".tmp"))


def save_adapter(model: nn.Module, directory, delta: torch.Tensor | None = None,
                 biases: dict | None = None, prompt: dict | None = None) -> Path:
    """Write propulsion.safetensors and propulsion_config.json (only rank 0 writes).

    Without ``delta`` every rank calls it (ZeRO-3 gathers). With ``delta`` (DeepSpeed's fp32
    master, gathered by the caller) it runs no collective and may run on rank 0 alone; with
    ``train_bias`` under ZeRO-3 pass ``biases=trained_biases(model)`` (gathered on every rank) too.
    ``prompt`` (``{"format": data.format, "template": data.template}``) is kept as the config's
    "prompt" entry, so inference renders prompts as training did (launch/generate.py); readers
    treat a config without it (older adapters) as raw text.
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
        if prompt is not None:
            meta["prompt"] = dict(prompt)
        _atomic_write(directory / WEIGHTS_FILE,
                      lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, str(p),
                                          metadata={"format": "pt", "format_version": str(FORMAT_VERSION)}))
        _atomic_write(directory / CONFIG_FILE,
                      lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _read(path: Path, load, errors: tuple, missing: str, damaged: str):
    """``load(path)``, or an AdapterError naming ``path``: not there, or not readable (``damaged``
    is formatted with the error as ``e``)."""
    if not path.is_file():
        raise AdapterError(f"{path} not found{missing}")
    try:
        return load(path)
    except errors as e:
        raise AdapterError(f"{path} " + damaged.format(e=e)) from None


def read_adapter_config(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    meta = _read(path, lambda p: json.loads(p.read_text()), (json.JSONDecodeError, UnicodeDecodeError),
                 ": not a propulsion adapter directory", "is not valid JSON: {e}")
    if not isinstance(meta, dict) or not isinstance(meta.get("propulsion"), dict) \
            or not isinstance(meta.get("targets"), dict):
        raise AdapterError(f"{path} lacks 'propulsion' and 'targets': not a propulsion adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {meta.get('format_version')!r}; "
                           f"this propulsion_ds reads version {FORMAT_VERSION}")
    return meta


def adapter_config(meta: dict, directory) -> PropulsionConfig:
    """The PropulsionConfig an adapter was trained with, from its ``read_adapter_config`` dict."""
    try:
        return PropulsionConfig(**meta["propulsion"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{Path(directory) / CONFIG_FILE}: bad 'propulsion' section ({e})") from None


def read_adapter_weights(directory) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    return _read(Path(directory) / WEIGHTS_FILE, lambda p: load_file(str(p)),
                 (SafetensorError, OSError, ValueError), "", "is truncated or corrupted ({e})")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Inject (if not yet) with the adapter's config and load its z values."""
    meta = read_adapter_config(directory)
    config = adapter_config(meta, directory)
    check_architecture(model, meta)           # before inject: a wrong model is left as it was
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
