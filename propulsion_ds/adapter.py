"""Adapter files: the trained z of every target, as safetensors + a JSON description."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .propulsion import DELTA_NAME, PropulsionConfig, _require_state, get_state, inject

WEIGHTS_FILE = "propulsion.safetensors"
CONFIG_FILE = "propulsion_config.json"
FORMAT_VERSION = 1
KEY_SUFFIX = ".propulsion"


class AdapterError(ValueError):
    """An adapter file that cannot be used with this model; the message says why."""


def gathered(params, modifier_rank=None):
    """Gather ZeRO-3 partitioned params for the block (a no-op for ordinary tensors)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def adapter_state_dict(model: nn.Module, delta: torch.Tensor | None = None) -> dict:
    """{"<module>.propulsion": fp32 z} on CPU; shape (d_out,) or (n, d_out) if num_vectors > 1.

    ``delta`` overrides the model's own tensor, e.g. DeepSpeed's fp32 master copy.
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
    return out


def _expected_shapes(model) -> dict:
    state = _require_state(model)
    n = state.config.num_vectors
    return {s.name + KEY_SUFFIX: ((s.size,) if n == 1 else (n, s.size)) for s in state.slots}


def load_adapter_state_dict(model: nn.Module, sd: dict) -> None:
    """Strict load of z values; a missing/unexpected key or wrong shape names the key."""
    state = _require_state(model)
    expected = _expected_shapes(model)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
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


def save_adapter(model: nn.Module, directory, delta: torch.Tensor | None = None) -> Path:
    """Write propulsion.safetensors and propulsion_config.json (rank 0 only; all ranks call it)."""
    from safetensors.torch import save_file

    state = _require_state(model)
    sd = adapter_state_dict(model, delta)
    directory = Path(directory)
    if _is_main_rank():
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "propulsion": state.config.to_dict(),
            **_base_description(model),
            "trainable_count": state.trainable_count,
            "targets": {s.name: s.size for s in state.slots},
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
