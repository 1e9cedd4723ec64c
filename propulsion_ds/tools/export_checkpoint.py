"""An adapter (our own format) from a DeepSpeed resume checkpoint: a killed run still yields one.

A checkpoint ``<run>/checkpoints/step_N`` holds no frozen weights (``exclude_frozen_parameters``)
and, under ZeRO-1/2/3, the fp32 master copy of the trainable vectors split across the ranks'
``*_optim_states.pt`` files. DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
stitches those partitions back together (it handles checkpoints without frozen parameters);
under ZeRO-0 the module state itself holds the whole vector. The run's config
(``<run>/config.json``, two levels up) says which model and which Propulsion settings; the model
is built on the ``meta`` device from its config.json alone (no weights) to recover the target
slots, and ``adapter.save_adapter`` writes the files the trainer itself writes: the exported
adapter of step N equals the adapter the run wrote at step N, bit for bit.

Every ``.pt`` file is first parsed with PyTorch's restricted unpickler
(``checkpoint.safe_torch_load``), as resuming does, before DeepSpeed's loader (which unpickles
without that restriction) sees it.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from propulsion_ds.errors import ConfigError, ExportError
from propulsion_ds.method.compat import meta_skeleton
from propulsion_ds.method.adapter import save_adapter
from propulsion_ds.method.propulsion import DELTA_NAME, get_state, inject
from propulsion_ds.tools.outdir import check_export_out, staged
from propulsion_ds.train.checkpoint import META_FILE, read_step_meta
from propulsion_ds.errors import CheckpointError
from propulsion_ds.train.safe_load import safe_torch_load

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"


@dataclass
class CheckpointExport:
    out: Path
    step: int | None
    zero_stage: int
    world_size: int
    trainable: int


def run_config_path(step_dir: Path) -> Path:
    """<run>/config.json for <run>/checkpoints/step_N."""
    return step_dir.resolve().parent.parent / RUN_CONFIG


def _read_run_config(path: Path):
    from propulsion_ds.config.load import load_config

    if not path.is_file():
        raise ExportError(f"{path} not found: the run's config.json (two levels above the checkpoint) "
                          f"is needed; pass --config PATH")
    try:
        return load_config(path, check_files=False)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None


def _read_meta(step_dir: Path) -> dict:
    path = step_dir / META_FILE
    if not path.is_file():
        raise ExportError(f"{step_dir} is not a complete checkpoint (no {META_FILE}); "
                          f"pass a checkpoints/step_N directory")
    return read_step_meta(step_dir)


def _zero_stage(step_dir: Path) -> tuple[int, int]:
    """(ZeRO stage, number of rank files) from the files' own headers."""
    optim = sorted(step_dir.glob("*_optim_states.pt"))
    if optim:
        sd = safe_torch_load(optim[0]).get("optimizer_state_dict", {})
        if "zero_stage" not in sd:
            raise ExportError(f"{optim[0]} holds no ZeRO optimizer state")
        return int(sd["zero_stage"]), len(optim)
    if (step_dir / "mp_rank_00_model_states.pt").is_file():
        return 0, 1
    raise ExportError(f"{step_dir} holds no DeepSpeed model or optimizer state files: not a checkpoint directory")


def _quietly(fn, *args, **kwargs):
    """zero_to_fp32 prints progress and tqdm bars; the library logs instead of printing."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn(*args, **kwargs)
    for line in out.getvalue().splitlines():
        log.debug("zero_to_fp32: %s", line)
    return result


def fp32_trainables(step_dir: Path) -> tuple[dict, int]:
    """({parameter name: fp32 tensor} of the trainable parameters, ZeRO stage)."""
    step_dir = Path(step_dir)
    for f in sorted(step_dir.glob("*.pt")):
        safe_torch_load(f)                       # restricted unpickler first (raises CheckpointError)
    stage, _ = _zero_stage(step_dir)
    if stage == 0:
        # ZeRO-0 keeps the whole module state (only trainables: frozen ones are excluded).
        state = safe_torch_load(step_dir / "mp_rank_00_model_states.pt")
        module = state.get("module") or {}
        out = {k: v for k, v in module.items() if k not in set(state.get("buffer_names") or [])}
        # bf16/fp16: this is the rounded module copy, not the optimizer's fp32 master
        # (FP16_UnfusedOptimizer's fp32_groups); it is what the trainer's own adapter holds
        # under ZeRO-0 (safe_get_full_fp32_param finds no master there), so the two stay equal.
        return {k: v.float().clone() for k, v in out.items()}, 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        sd = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(step_dir.parent), tag=step_dir.name,
                      exclude_frozen_parameters=True)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise ExportError(f"{step_dir}: DeepSpeed could not reassemble the fp32 vectors "
                          f"({' '.join(str(e).split())[:300]})") from None
    names = set()
    for f in sorted(step_dir.glob("*_model_states.pt")):
        state = safe_torch_load(f)
        for group in state.get("param_shapes") or []:
            names.update(group)
        break
    return {k: v.float().clone() for k, v in sd.items() if k in names}, stage


def _set_trained_biases(model: nn.Module, params: dict) -> None:
    """Put trained non-delta parameters (``train_bias``: the targets' biases) on the skeleton,
    so ``save_adapter`` finds real values where the meta model has none."""
    modules = dict(model.named_modules())
    for name, value in params.items():
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if module is None or not isinstance(getattr(module, attr, None), nn.Parameter):
            raise ExportError(f"the checkpoint trains {name!r}, which the model built from the run's "
                              f"config does not have")
        setattr(module, attr, nn.Parameter(value.reshape(getattr(module, attr).shape), requires_grad=True))


def adapter_from_checkpoint(step_dir, out, *, config=None, base=None, overwrite: bool = False,
                            trust_remote_code: bool | None = None) -> CheckpointExport:
    """Write the adapter of checkpoint ``step_dir`` (our format) into ``out``.

    ``config``: the run's config.json (default: two levels above ``step_dir``); ``base``: where the
    base model's config.json is (default: the run's ``model.name_or_path``). Raises ExportError,
    CheckpointError or AdapterError with a one-line message; nothing is left at ``out`` then.
    """
    step_dir, out = Path(step_dir), Path(out)
    if not step_dir.is_dir():
        raise ExportError(f"--checkpoint: directory not found: {str(step_dir)!r}")
    meta = _read_meta(step_dir)
    cfg = _read_run_config(Path(config) if config is not None else run_config_path(step_dir))
    if meta.get("propulsion") not in (None, cfg.propulsion.to_dict()):
        raise ExportError(f"{step_dir} was written with propulsion {meta['propulsion']}, the run config "
                          f"says {cfg.propulsion.to_dict()}: pass the matching --config")
    remote = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    model = meta_skeleton(base if base is not None else cfg.model.name_or_path, remote)
    # What save_adapter records as the base: the name the run loaded, as the trainer wrote it.
    model.config._name_or_path = cfg.model.name_or_path
    inject(model, cfg.propulsion)
    state = get_state(model)
    if "trainable" in meta and meta["trainable"] != state.trainable_count:
        raise ExportError(f"{step_dir} trains {meta['trainable']} values, the model built from "
                          f"{base or cfg.model.name_or_path} with the run's settings has "
                          f"{state.trainable_count}: not this model's checkpoint")

    params, stage = fp32_trainables(step_dir)
    if DELTA_NAME not in params:
        raise ExportError(f"{step_dir} holds no {DELTA_NAME}: not a Propulsion checkpoint")
    delta = params.pop(DELTA_NAME)
    shape = (state.config.num_vectors, state.trainable_count // state.config.num_vectors)
    if delta.numel() != shape[0] * shape[1]:
        raise ExportError(f"{step_dir}: {DELTA_NAME} has {delta.numel()} values, the model expects {shape}")
    _set_trained_biases(model, params)

    check_export_out(out, overwrite, step_dir)
    with staged(out) as tmp:
        # the prompt entry as the trainer writes it, so launch/generate.py renders as training did
        save_adapter(model, tmp, delta=delta.reshape(shape),
                     prompt={"format": cfg.data.format, "template": cfg.data.template})
    step = meta.get("step")
    return CheckpointExport(out=out, step=step if isinstance(step, int) else None, zero_stage=stage,
                            world_size=int(meta.get("world_size", 1)), trainable=state.trainable_count)


__all__ = ["CheckpointExport", "adapter_from_checkpoint", "fp32_trainables", "run_config_path"]
