"""Export a Propulsion adapter as a peft IA3 adapter (adapter_config.json + adapter_model.safetensors).

Why this is exact: peft's IA3 ``Linear`` for a module NOT listed in ``feedforward_modules``
computes ``base_layer(x) * ia3_l.flatten()`` (then casts back to the output's dtype), with
``ia3_l`` of shape ``(out_features, 1)``; Propulsion computes ``y * z**k`` per output channel. So
``ia3_l = z**k`` in fp32 (``mean_i z_i**k`` when the adapter has several vectors per module) is the
same function, and peft's ``merge_and_unload`` multiplies the weight rows (and the bias) by it,
as our merge does.

``feedforward_modules`` is written explicitly as ``[]``: left unset, peft fills it from its own
table (``down_proj`` for LLaMA), and a feedforward IA3 module scales the module's INPUT instead.

What IA3 cannot express, refused with the setting named: a scaled input embedding
(``propulsion.embeddings``: peft's IA3 has no Embedding layer) and trained biases
(``propulsion.train_bias``: IA3 only scales), and a scaled ``lm_head`` tied to the input
embedding (``tie_word_embeddings``: peft's merge would scale the shared weight, i.e. both). The export is one-way: z and k cannot be recovered
from z**k, so training resumes from our own adapter / checkpoint format, never from the export.

The scale is ``propulsion.channel_scales`` of the delta the adapter holds (``adapter.adapter_delta``),
as the training hook computes it, so the exported values are the ones the hook multiplies by.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from propulsion_ds.errors import ExportError
from propulsion_ds.method.adapter import (KEY_SUFFIX, adapter_config, adapter_delta, read_adapter_config,
                                          read_adapter_weights)
from propulsion_ds.method.compat import injected_skeleton
from propulsion_ds.method.propulsion import PropulsionConfig, channel_scales, scaled_tied_pair
from propulsion_ds.tools.outdir import check_export_out, staged

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."      # what get_peft_model_state_dict puts before a module name
PEFT_SUFFIX = ".ia3_l"


@dataclass
class PeftExport:
    out: Path
    modules: int
    fan_in_fan_out: bool
    base_model_name_or_path: str


def _refuse_inexpressible(pcfg: PropulsionConfig, weights: dict) -> None:
    if pcfg.embeddings:
        raise ExportError("propulsion.embeddings=true: peft IA3 cannot scale an input embedding; "
                          "use launch/merge.py (or our adapter format) for this adapter")
    extra = [k for k in weights if not k.endswith(KEY_SUFFIX)]
    if pcfg.train_bias or extra:
        what = f" (the adapter holds {extra[0]!r})" if extra else ""
        raise ExportError(f"propulsion.train_bias=true{what}: peft IA3 only scales, it cannot carry "
                          f"trained biases; use launch/merge.py (or our adapter format) for this adapter")


def _refuse_tied_head(model: nn.Module) -> None:
    """A scaled lm_head whose weight is the input embedding's (tie_word_embeddings): peft's
    merge_and_unload scales that one shared tensor, so the embedding changes too. The merge refuses
    the same pair (tools/merge_plan.py) unless it may untie, which an IA3 adapter cannot ask for."""
    pair = scaled_tied_pair(model)
    if pair is not None:
        raise ExportError(f"{pair[1]!r} is scaled but shares its weight with {pair[0]!r} "
                          f"(tie_word_embeddings): peft's merge would scale the embedding too; "
                          f"use launch/merge.py --untie for this adapter")


def ia3_vectors(model: nn.Module, weights: dict) -> dict:
    """{module name: fp32 z**k of shape (d_out, 1)} in the model's target order (the adapter's:
    ``injected_skeleton`` checked that), from the adapter's tensors ``weights``."""
    scales = channel_scales(model, adapter_delta(model, weights))
    return {name: s.reshape(-1, 1).contiguous() for name, s in scales.items()}


def peft_config(targets: list, fan_in_fan_out: bool, base_name: str) -> dict:
    """adapter_config.json for peft's IA3 (the fields peft 0.21's IA3Config.save_pretrained writes)."""
    return {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "auto_mapping": None,
        "inference_mode": True,
        "target_modules": list(targets),       # full module names: peft matches them exactly
        "exclude_modules": None,
        "feedforward_modules": [],             # explicit: every target scales its OUTPUT
        "fan_in_fan_out": fan_in_fan_out,      # True for GPT-2 style Conv1D (weight stored (in, out))
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


def _module_kinds(model: nn.Module, targets) -> bool:
    """Check every target is a module peft IA3 scales by output; return fan_in_fan_out."""
    from propulsion_ds.method.targets import is_conv1d

    modules = dict(model.named_modules())
    conv1d, linear = [], []
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Embedding):
            raise ExportError(f"target {name!r} is an embedding (propulsion.targets): peft IA3 cannot "
                              f"scale an embedding")
        if is_conv1d(m):
            conv1d.append(name)
        elif isinstance(m, nn.Linear):
            linear.append(name)
        else:
            raise ExportError(f"target {name!r} is a {type(m).__name__}: peft IA3 supports Linear and Conv1D")
    # peft keeps fan_in_fan_out per module (it corrects the flag for the other kind with a warning),
    # so a model mixing Conv1D and Linear targets (GPT-2 with lm_head) still loads correctly.
    return bool(conv1d) and len(conv1d) >= len(linear)


def export_peft(adapter, out, *, base=None, base_name: str | None = None, overwrite: bool = False,
                trust_remote_code: bool = False) -> PeftExport:
    """Write ``adapter`` (our format) as a peft IA3 adapter directory ``out``.

    ``base``: where the base model's config.json is (default: the base the adapter records);
    ``base_name``: what adapter_config.json records as ``base_model_name_or_path`` (default:
    ``base`` if given, else the adapter's recorded base).
    """
    from safetensors.torch import save_file

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise ExportError(f"--adapter: directory not found: {str(adapter)!r}")
    meta = read_adapter_config(adapter)
    pcfg = adapter_config(meta, adapter)
    weights = read_adapter_weights(adapter)
    _refuse_inexpressible(pcfg, weights)

    recorded = meta.get("base_model") or ""
    base = base if base is not None else recorded
    if not base:
        raise ExportError(f"{adapter} records no base model: pass --base DIR")
    model = injected_skeleton(base, meta, pcfg, trust_remote_code)
    _refuse_tied_head(model)
    fan_in_fan_out = _module_kinds(model, meta["targets"])

    vectors = ia3_vectors(model, weights)
    name = base_name if base_name is not None else str(base)
    check_export_out(out, overwrite, adapter)
    with staged(out) as tmp:
        save_file({PEFT_PREFIX + k + PEFT_SUFFIX: v for k, v in vectors.items()},
                  str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(
            json.dumps(peft_config(list(vectors), fan_in_fan_out, name), indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(adapter, pcfg))
    return PeftExport(out=out, modules=len(vectors), fan_in_fan_out=fan_in_fan_out,
                      base_model_name_or_path=name)


def _readme(adapter: Path, pcfg: PropulsionConfig) -> str:
    return (f"peft IA3 adapter exported from the Propulsion adapter {adapter} (degree k={pcfg.degree}, "
            f"{pcfg.num_vectors} vector(s) per module): ia3_l = z**k"
            f"{' averaged over the vectors' if pcfg.num_vectors > 1 else ''}.\n"
            f"One-way: z and k cannot be recovered from z**k; resume training from the Propulsion "
            f"adapter or checkpoint, not from this directory.\n")
