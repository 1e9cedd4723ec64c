"""Which modules Propulsion scales, and how wide their outputs are."""
from __future__ import annotations

import re

from torch import nn

ATTENTION_PART = re.compile(r"(attn|attention)", re.IGNORECASE)


def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear map with weight stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def module_out_features(module: nn.Module) -> int:
    """Output width without touching weight.shape (ZeRO-3 partitions weights to shape 0)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if is_conv1d(module):
        return module.nf
    ds_shape = getattr(module.weight, "ds_shape", None)
    shape = ds_shape if ds_shape is not None else module.weight.shape
    return int(shape[0])


def weight_axis(module: nn.Module) -> int:
    """The output-channel axis of the module's weight: 0 for nn.Linear (out, in), -1 for an
    Embedding (num, dim) or a GPT-2 Conv1D (in, out)."""
    return -1 if isinstance(module, nn.Embedding) or is_conv1d(module) else 0


def pattern_matches(pattern: str, name: str) -> bool:
    """A target pattern matches a module name as a dotted suffix or as a full regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the longest ModuleList in the model (model.layers, transformer.h, ...)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers to target")
    return best


def _layer_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    prefix, layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) in inside and is_linear(m)]


def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """Targeted (name, module) pairs in model order."""
    if config.targets == "all-linear":
        chosen = _layer_linears(model)
    elif config.targets == "attention":
        chosen = [(n, m) for n, m in _layer_linears(model)
                  if any(ATTENTION_PART.search(part) for part in n.split("."))]
    else:
        candidates = [(n, m) for n, m in model.named_modules()
                      if is_linear(m) or isinstance(m, nn.Embedding)]
        for pattern in config.targets:
            if not any(pattern_matches(pattern, n) for n, _ in candidates):
                raise ValueError(f"propulsion target pattern {pattern!r} matches no linear or "
                                 f"embedding module of {type(model).__name__}")
        chosen = [(n, m) for n, m in candidates if any(pattern_matches(p, n) for p in config.targets)]
    if not chosen:
        raise ValueError(f"propulsion targets={config.targets!r} match no module of {type(model).__name__}")

    extra = []
    if config.embeddings:
        extra.append(model.get_input_embeddings())
    if config.lm_head:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head to target")
        extra.append(head)
    wanted = {id(m) for _, m in chosen} | {id(m) for m in extra if m is not None}
    return [(n, m) for n, m in model.named_modules() if id(m) in wanted and n]
