"""Propulsion (arXiv 2409.10927): y' = y * z**k per output channel of each targeted frozen module.

Layout (docs/DESIGN.md, "How the method is built"): one flat trainable offset ``delta`` of shape
``(num_vectors, total_d_out)`` is registered on the root model as ``propulsion_delta`` (z = 1 + delta); a forward hook on each
targeted module slices its channels. No wrapper modules and one tensor in all, because under
ZeRO-3 every extra module and tensor costs bookkeeping on every step. ZeRO gathers the root's
parameters for the whole forward and backward, so every slice reads gathered data.

Scale: every target hook computes its own ``mean_i (1 + delta[i, lo:hi])**k`` from the delta as
it is at that call (``scale._Propel``). Nothing is cached between hooks or calls, so no scale is
ever stale: a submodule called on its own, an in-place or ``.data`` write to the delta, two
backward passes, gradient accumulation and reentrant / non-reentrant activation checkpointing
all see the current delta. Where multi-propulsion (``num_vectors > 1``) starts: ``multi.py``.

This module is the model-facing part (config, injection, the per-target scales, the in-memory
merge); the tensor arithmetic lives in ``scale.py`` and is re-exported here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from propulsion_ds.method.multi import initial_delta
from propulsion_ds.method.scale import _Propel, fold, scale_from_delta
from propulsion_ds.method.targets import find_targets, module_out_features, weight_axis

DELTA_NAME = "propulsion_delta"
STATE_ATTR = "_propulsion_state"


@dataclass
class PropulsionConfig:
    degree: int = 15
    targets: Union[str, list] = "all-linear"
    embeddings: bool = False
    lm_head: bool = False
    num_vectors: int = 1
    train_bias: bool = False

    def __post_init__(self):
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ValueError(f"propulsion.degree must be an integer >= 1, got {self.degree!r}")
        if isinstance(self.num_vectors, bool) or not isinstance(self.num_vectors, int) or self.num_vectors < 1:
            raise ValueError(f"propulsion.num_vectors must be an integer >= 1, got {self.num_vectors!r}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.targets, str):
            if self.targets not in ("all-linear", "attention"):
                raise ValueError(
                    f"propulsion.targets must be 'all-linear', 'attention' or a list of "
                    f"module-name suffixes/regexes, got {self.targets!r}")
        elif not (isinstance(self.targets, list) and self.targets
                  and all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(f"propulsion.targets must be a non-empty list of strings, got {self.targets!r}")
        for name in ("embeddings", "lm_head", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"propulsion.{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Slot:
    """Where one module's channels live in the flat delta."""
    name: str
    offset: int
    size: int


@dataclass
class PropulsionState:
    config: PropulsionConfig
    slots: list
    handles: list = field(default_factory=list)

    @property
    def trainable_count(self) -> int:
        return self.config.num_vectors * sum(s.size for s in self.slots)


class _ScaleHook:
    """Forward hook y -> y * mean_i (1 + delta[i, lo:hi])**k, the delta read from the root NOW.

    An object rather than a closure: ``copy.deepcopy`` (and pickling) of the model then rebinds
    ``root`` to the copy, so a copied model reads its own delta, not the original's.
    """

    def __init__(self, root: nn.Module, lo: int, hi: int, degree: int):
        self.root, self.lo, self.hi, self.degree = root, lo, hi, degree

    def __call__(self, module, args, output):
        delta = getattr(self.root, DELTA_NAME)
        if delta.dim() != 2:
            # ZeRO-3 keeps a partitioned delta as a flat shard outside the root's forward.
            raise RuntimeError(
                "the Propulsion delta is partitioned (ZeRO-3): call the root model, or gather "
                f"{DELTA_NAME} (deepspeed.zero.GatheredParameters) before calling a submodule")
        inplace = output.is_floating_point() and not output._is_view()
        if torch.is_grad_enabled() and (delta.requires_grad or output.requires_grad):
            return _Propel.apply(output, delta[:, self.lo:self.hi], self.degree, inplace)
        with torch.no_grad():
            s = scale_from_delta(delta[:, self.lo:self.hi], self.degree)
            dtype = torch.promote_types(output.dtype, s.dtype)
            if inplace and output.dtype == dtype:
                return output.mul_(s)
            return (output.to(dtype) * s.to(dtype)).to(output.dtype)


def get_state(model: nn.Module) -> PropulsionState | None:
    return getattr(model, STATE_ATTR, None)


def inject(model: nn.Module, config: PropulsionConfig | None = None) -> list[str]:
    """Add Propulsion to ``model`` in place, freeze everything else, return the target names."""
    config = config or PropulsionConfig()
    if get_state(model) is not None:
        raise ValueError("Propulsion is already injected into this model; inject() may run once")
    targets = find_targets(model, config)
    slots, offset = [], 0
    for name, module in targets:
        size = module_out_features(module)
        slots.append(Slot(name, offset, size))
        offset += size

    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else None
    delta = nn.Parameter(initial_delta(config.num_vectors, offset, config.degree, dtype, device))
    model.register_parameter(DELTA_NAME, delta)

    state = PropulsionState(config=config, slots=slots)
    modules = dict(targets)
    for slot in slots:
        module = modules[slot.name]
        hook = _ScaleHook(model, slot.offset, slot.offset + slot.size, config.degree)
        state.handles.append(module.register_forward_hook(hook))
        if config.train_bias and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    setattr(model, STATE_ATTR, state)
    return [s.name for s in slots]


def trainable_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def channel_scales(model: nn.Module, delta: torch.Tensor | None = None) -> dict:
    """{module name: fp32 z**k (or mean of powers), shape (d_out,)} on the delta's device.

    The one place the per-target scales are computed from a delta: training's statistics (the
    model's own delta or DeepSpeed's fp32 master), ``merge_and_unload``, and, with the delta
    rebuilt from an adapter file (``adapter.adapter_delta``), the streaming merge and the peft
    export. ``delta`` (n, total_d_out) must be whole (gathered), not a ZeRO-3 shard.
    """
    state = _require_state(model)
    delta = (getattr(model, DELTA_NAME) if delta is None else delta).detach()
    # Per target, from its own slice, as the hook does: one reduction over the whole delta
    # rounds a multi-vector mean differently (by an ulp) from the scale training multiplied by.
    return {s.name: scale_from_delta(delta[:, s.offset:s.offset + s.size], state.config.degree)
            for s in state.slots}


def _require_state(model: nn.Module) -> PropulsionState:
    state = get_state(model)
    if state is None:
        raise ValueError("this model has no Propulsion injected (call inject() first)")
    return state


def scaled_tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding name, lm_head name) when the two share one weight and Propulsion scales
    either: folding the scale into that one tensor would change both roles. Else None."""
    state = _require_state(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is not out.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    pair = (names[id(inp)], names[id(out)])
    return pair if {s.name for s in state.slots} & set(pair) else None


def _untie_head(model: nn.Module) -> None:
    """Give lm_head its own copy of the tied weight, and make transformers keep it untied."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    if hasattr(model, "all_tied_weights_keys"):
        # transformers >= 5 caches the tie mapping at init; tie_weights(recompute_mapping=False)
        # (init_weights, from_pretrained) would otherwise re-tie lm_head to the scaled embedding.
        model.all_tied_weights_keys = {}


def merge_and_unload(model: nn.Module, untie: bool = False) -> nn.Module:
    """Fold z**k into the weights, remove hooks and the delta; keys then equal the base model's.

    Runs on a whole (not ZeRO-partitioned) model.
    """
    state = _require_state(model)
    if scaled_tied_pair(model) is not None:
        if not untie:
            raise ValueError(
                "the input embedding and lm_head share one weight, and Propulsion scales one of "
                "them: merging would change both. Pass untie=True (or --untie) to give lm_head "
                "its own copy first")
        _untie_head(model)
    scales = channel_scales(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for slot in state.slots:
            module, scale = modules[slot.name], scales[slot.name]
            module.weight.copy_(fold(module.weight, scale, weight_axis(module)))
            if getattr(module, "bias", None) is not None:   # the trained bias when train_bias
                module.bias.copy_(fold(module.bias, scale, 0))
    for handle in state.handles:
        handle.remove()
    del model._parameters[DELTA_NAME]
    delattr(model, STATE_ATTR)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
