"""Propulsion (arXiv 2409.10927): y' = y * z**k per output channel of each targeted frozen module.

Layout (DESIGN §3): one flat trainable offset ``delta`` of shape ``(num_vectors, total_d_out)``
is registered on the root model as ``propulsion_delta``; a forward hook on each targeted module
slices its channels. No wrapper modules and one tensor in all, because under ZeRO-3 every extra
module and tensor costs bookkeeping on every step. ZeRO gathers the root's parameters for the
whole forward and backward, so every slice reads gathered data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from .targets import find_targets, module_out_features

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


def scale_from_delta(delta: torch.Tensor, degree: int) -> torch.Tensor:
    """Channel scale mean_i (1 + delta_i)**k from a (n, d) offset (DESIGN §1 Numerics).

    Computed in fp32, or in float64 for a float64 delta (never below the delta's precision).
    """
    z = 1.0 + delta.to(torch.promote_types(delta.dtype, torch.float32))
    if z.shape[0] == 1:
        return z[0] ** degree
    return (z ** degree).mean(0)


class _ScaleHook:
    """Forward hook y -> y * scale(delta[:, lo:hi]), computed in fp32 (float64 for float64 y).

    An object rather than a closure: ``copy.deepcopy`` (and pickling) of the model then rebinds
    ``root`` to the copy, so a copied model reads its own delta, not the original's.
    """

    def __init__(self, root: nn.Module, lo: int, hi: int, degree: int):
        self.root, self.lo, self.hi, self.degree = root, lo, hi, degree

    def __call__(self, module, args, output):
        scale = scale_from_delta(getattr(self.root, DELTA_NAME)[:, self.lo:self.hi], self.degree)
        dtype = torch.promote_types(output.dtype, scale.dtype)
        return (output.to(dtype) * scale.to(dtype)).to(output.dtype)


def _make_hook(root: nn.Module, slot: Slot, degree: int):
    return _ScaleHook(root, slot.offset, slot.offset + slot.size, degree)


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
    delta = nn.Parameter(torch.zeros(config.num_vectors, offset, dtype=dtype, device=device))
    model.register_parameter(DELTA_NAME, delta)

    state = PropulsionState(config=config, slots=slots)
    modules = dict(targets)
    for slot in slots:
        module = modules[slot.name]
        state.handles.append(module.register_forward_hook(_make_hook(model, slot, config.degree)))
        if config.train_bias and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    setattr(model, STATE_ATTR, state)
    return [s.name for s in slots]


def trainable_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def channel_scales(model: nn.Module, delta: torch.Tensor | None = None) -> dict:
    """{module name: fp32 z**k (or mean of powers)} on the delta's device; delta must be whole."""
    state = _require_state(model)
    delta = getattr(model, DELTA_NAME) if delta is None else delta
    full = scale_from_delta(delta.detach(), state.config.degree)
    return {s.name: full[s.offset:s.offset + s.size] for s in state.slots}


def _require_state(model: nn.Module) -> PropulsionState:
    state = get_state(model)
    if state is None:
        raise ValueError("this model has no Propulsion injected (call inject() first)")
    return state


def _tied(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and inp.weight is out.weight


def merge_and_unload(model: nn.Module, untie: bool = False) -> nn.Module:
    """Fold z**k into the weights, remove hooks and the delta; keys then equal the base model's.

    Runs on a whole (not ZeRO-partitioned) model.
    """
    from .targets import is_conv1d  # local: keeps the transformers import lazy

    state = _require_state(model)
    in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    scaled = {s.name for s in state.slots}
    names = {id(m): n for n, m in model.named_modules()}
    touches_tied = any(names.get(id(m)) in scaled for m in (in_emb, out_emb) if m is not None)
    if touches_tied and _tied(model):
        if not untie:
            raise ValueError(
                "the input embedding and lm_head share one weight, and Propulsion scales one of "
                "them: merging would change both. Pass untie=True (or --untie) to give lm_head "
                "its own copy first")
        out_emb.weight = nn.Parameter(out_emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
        if hasattr(model, "all_tied_weights_keys"):
            # transformers >= 5 caches the tie mapping at init; tie_weights(recompute_mapping=False)
            # (init_weights, from_pretrained) would otherwise re-tie lm_head to the scaled embedding.
            model.all_tied_weights_keys = {}

    scales = channel_scales(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for slot in state.slots:
            module, s = modules[slot.name], scales[slot.name]
            w = module.weight
            wd = torch.promote_types(w.dtype, s.dtype)
            if isinstance(module, nn.Embedding) or is_conv1d(module):  # (vocab|in, out)
                w.copy_((w.to(wd) * s.to(wd)[None, :]).to(w.dtype))
            else:  # nn.Linear: (out, in)
                w.copy_((w.to(wd) * s.to(wd)[:, None]).to(w.dtype))
            b = getattr(module, "bias", None)
            if b is not None:
                bd = torch.promote_types(b.dtype, s.dtype)
                b.copy_((b.to(bd) * s.to(bd)).to(b.dtype))
    for handle in state.handles:
        handle.remove()
    del model._parameters[DELTA_NAME]
    delattr(model, STATE_ATTR)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
