"""The model's shape for the memory planner, read off the model built on the ``meta`` device.

Built from its ``config.json`` (no weights, a few seconds even for 70B), Propulsion injected with
the run config's section: total parameters, the largest single module (DeepSpeed's "largest
layer"), one decoder layer, the trainable Propulsion channels, and what LoRA r=8 on the same
linears would train.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from propulsion_ds.errors import PlanError

REPO_ROOT = Path(__file__).resolve().parents[3]
SHIPPED_MODEL_CONFIGS = REPO_ROOT / "configs" / "models"
LORA_RANK = 8


@dataclass
class ModelShape:
    source: str                 # the config.json the shape was read from
    architecture: str
    total_params: int
    largest_module: str
    largest_module_params: int
    decoder_layer_params: int   # the largest decoder layer (all its modules)
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    propulsion_trainable: int
    lora_trainable: int
    intermediate_size: int = 0  # MLP width I (0: 4h)
    kv_dim: int = 0             # K/V projection width kv_heads * head_dim (0: h)
    small_param_numels: list = field(default_factory=list, repr=False)   # for persistence

    def persistent_params(self, threshold: int) -> int:
        return sum(n for n in self.small_param_numels if n <= threshold)


def _normalise(name: str) -> str:
    name = name.lower().rstrip("/")
    name = re.sub(r"[-_]hf$", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


def resolve_model_config(name_or_path: str, explicit: str | None = None) -> Path:
    """The config.json to plan with.

    ``explicit`` (a config.json or a directory holding one) wins. Else ``<name_or_path>/config.json``.
    Else, for a placeholder path such as ``/path/to/llama-2-70b-hf`` or a hub id such as
    ``meta-llama/Llama-2-70b-hf``, the shipped ``configs/models/<name>/config.json`` whose name
    matches the path's last component ignoring case, punctuation and a trailing ``-hf``.
    """
    def as_file(p: Path) -> Path:
        return p / "config.json" if p.is_dir() else p

    if explicit:
        p = as_file(Path(explicit))
        if not p.is_file():
            raise PlanError(f"model config not found: {explicit!r} (a config.json or its directory)")
        return p
    p = Path(name_or_path) / "config.json"
    if p.is_file():
        return p
    want = _normalise(Path(name_or_path).name)
    if SHIPPED_MODEL_CONFIGS.is_dir():
        for d in sorted(SHIPPED_MODEL_CONFIGS.iterdir()):
            if _normalise(d.name) == want and (d / "config.json").is_file():
                return d / "config.json"
    raise PlanError(f"no config.json at {str(p)!r} and no shipped configs/models/* matches "
                    f"{Path(name_or_path).name!r}: pass --model-config PATH/config.json")


def _largest_module(model) -> tuple[str, int]:
    """DeepSpeed's ``model_to_params`` definition: a module's own (non-recursive) parameters."""
    largest_name, largest = "", 0
    for name, m in model.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest_name, largest = name, n
    return largest_name, largest


def _lora_count(model, lora_rank: int) -> int:
    from torch import nn
    from propulsion_ds.method.propulsion import PropulsionConfig
    from propulsion_ds.method.targets import find_targets
    return sum(lora_rank * (m.in_features + m.out_features) if isinstance(m, nn.Linear)
               else lora_rank * (m.nx + m.nf) for _, m in find_targets(model, PropulsionConfig(targets="all-linear")))


def model_shape(config_path, propulsion_config=None, lora_rank: int = LORA_RANK) -> ModelShape:
    """Counts read off the model built on the meta device (no weights are allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from propulsion_ds.method.propulsion import PropulsionConfig, get_state, inject
    from propulsion_ds.method.targets import decoder_layers

    config_path = Path(config_path)
    try:
        cfg = AutoConfig.from_pretrained(str(config_path.parent))
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read model config {str(config_path)!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)

    params = list(model.parameters())                 # shared (tied) tensors listed once
    largest_name, largest = _largest_module(model)
    _, layers = decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    lora = _lora_count(model, lora_rank)
    inject(model, propulsion_config or PropulsionConfig())
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    return ModelShape(
        source=str(config_path), architecture=type(model).__name__,
        total_params=sum(p.numel() for p in params), largest_module=largest_name,
        largest_module_params=largest, decoder_layer_params=layer_params, num_layers=len(layers),
        hidden_size=int(text.hidden_size), num_heads=int(text.num_attention_heads),
        vocab_size=int(text.vocab_size), propulsion_trainable=get_state(model).trainable_count,
        lora_trainable=lora,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        kv_dim=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        * int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        small_param_numels=sorted(p.numel() for p in params))
