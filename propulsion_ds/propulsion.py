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


def _identity(t):
    return t


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes)."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


class _ScaleCache:
    """The whole model's channel scale, computed once per forward and split per target.

    Per step this costs a handful of small tensor ops (add, pow, one split) instead of a slice,
    add and pow per target, and backward concatenates the targets' scale gradients once (split's
    backward) instead of scattering each slice into a zero tensor of the whole delta's size.

    The scale is computed lazily by the first target hook of a forward, where ZeRO-3 has gathered
    the root's delta (the root's pre-forward fetch has run). The root's forward pre-hook
    (``invalidate``) drops it before every forward; the cache is also keyed on the delta's
    identity, version and storage and on the grad mode, so without ZeRO a delta changed in place
    (an optimizer step) or a module called outside the root's forward never reads a stale scale.

    Activation checkpointing: the shared scale is computed outside the checkpoint's saved-tensor
    hooks, so an original forward and its recomputation save the same tensors; a recomputation
    (it runs inside backward) takes a fresh per-target scale instead of the cache, which keeps
    reentrant checkpointing's separate per-layer backward passes independent.

    ``values`` (detached) and ``invertible`` belong to the forward that computed them: a
    recomputation returns exactly those values and decides in place / not as the forward did.
    ``invertible``: every scale is finite and not tiny, so y can be scaled in place and recovered
    as y' / scale in backward (see ``_ScaleOutput``).
    """

    def __init__(self, root: nn.Module, sizes: list, degree: int):
        self.root, self.sizes, self.degree = root, list(sizes), degree
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.chunks, self.key = None, None                          # this forward's scale, split
        self.values, self.invertible, self.values_key = None, None, None   # the delta's scale values

    def invalidate(self, *unused) -> None:
        # Every forward of the root starts afresh: under ZeRO-3 an optimizer step may rewrite the
        # delta in the same storage without bumping its version, so the key alone cannot tell.
        self.chunks = self.key = self.values = self.invertible = self.values_key = None

    def get(self, index: int) -> tuple[torch.Tensor, bool]:
        """(this target's scale, whether every scale is invertible)."""
        delta = getattr(self.root, DELTA_NAME)
        values_key = (id(delta), delta._version, delta.data_ptr(), delta.dtype)
        if _in_backward():
            with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                return self._recomputed(delta, values_key, index), self.invertible
        key = values_key + (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if self.chunks is None or key != self.key:
            with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                scale = scale_from_delta(delta, self.degree)
            self.chunks, self.key = scale.split(self.sizes, dim=0), key
            self._set_values(scale.detach(), values_key)
        return self.chunks[index], self.invertible

    def _recomputed(self, delta: torch.Tensor, values_key: tuple, index: int) -> torch.Tensor:
        if self.values is None or values_key != self.values_key:
            with torch.no_grad():
                self._set_values(scale_from_delta(delta, self.degree), values_key)
        lo, hi = self.offsets[index], self.offsets[index] + self.sizes[index]
        part = scale_from_delta(delta[:, lo:hi], self.degree)
        # The forward's exact values (a slice's pow may round differently from the whole tensor's
        # in the last bit) with the slice's gradient: values - part is exact (the two are within a
        # factor of 2, Sterbenz), so part + (values - part) == values bit for bit.
        return part + (self.values[lo:hi] - part.detach())

    def _set_values(self, scale: torch.Tensor, values_key: tuple) -> None:
        tiny = torch.finfo(scale.dtype).tiny ** 0.5       # |y * s| stays a normal number
        self.values = scale
        self.invertible = bool((torch.isfinite(scale) & (scale.abs() >= tiny)).all())
        self.values_key = values_key

    def __getstate__(self):
        # copy.deepcopy / pickle: never carry computed tensors; root is rebound by the memo.
        state = self.__dict__.copy()
        state.update(chunks=None, key=None, values=None, invertible=None, values_key=None)
        return state


class _ScaleOutput(torch.autograd.Function):
    """y' = y * scale over the last dimension, in the promoted dtype, cast back to y's dtype.

    The same values and gradients as autograd's ``(y.to(dt) * scale.to(dt)).to(y.dtype)``, with
    less activation memory and no new tensor where possible:

    - y already in the working dtype and every scale invertible: y is scaled IN PLACE and only
      y' is saved (often shared with what the next op saves anyway: silu(gate), up * ..., v in
      attention); backward uses y = y' / scale, i.e. d/dscale = sum(g * y') / scale.
    - otherwise y' is a new tensor and y is saved in its own dtype (a bf16 y, not its fp32 copy).
    """

    @staticmethod
    def forward(ctx, y, scale, inplace):
        dtype = torch.promote_types(y.dtype, scale.dtype)
        ctx.inplace, ctx.y_dtype, ctx.s_dtype = inplace, y.dtype, scale.dtype
        ctx.dims = tuple(range(y.dim() - 1))
        s = scale if scale.dtype == dtype else scale.to(dtype)
        ctx.save_for_backward(y, s)
        if inplace:
            ctx.mark_dirty(y)
            return y.mul_(s)
        return y * s if y.dtype == dtype else (y.to(dtype) * s).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, s = ctx.saved_tensors
        if grad.dtype != s.dtype:
            grad = grad.to(s.dtype)
        grad_y = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_y = grad * s
            if ctx.y_dtype != s.dtype:
                grad_y = grad_y.to(ctx.y_dtype)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * (y if y.dtype == s.dtype else y.to(s.dtype))).sum(ctx.dims)
            if ctx.inplace:
                grad_scale.div_(s)
            if ctx.s_dtype != s.dtype:
                grad_scale = grad_scale.to(ctx.s_dtype)
        return grad_y, grad_scale, None


class _ScaleHook:
    """Forward hook y -> y * scale, scale = this target's slice of the model's (1+delta)**k.

    The scale is fp32 (float64 for a float64 delta), applied in the promoted dtype and cast back
    (``_ScaleOutput``). An object rather than a closure: ``copy.deepcopy`` (and pickling) of the
    model then rebinds the shared cache's ``root`` to the copy, so a copied model reads its own
    delta, not the original's.
    """

    def __init__(self, cache: _ScaleCache, index: int):
        self.cache, self.index = cache, index

    def __call__(self, module, args, output):
        scale, invertible = self.cache.get(self.index)
        same = output.dtype == scale.dtype
        dtype = scale.dtype if same else torch.promote_types(output.dtype, scale.dtype)
        inplace = invertible and output.dtype == dtype and not output._is_view()
        if torch.is_grad_enabled() and (scale.requires_grad or output.requires_grad):
            return _ScaleOutput.apply(output, scale, inplace)
        with torch.no_grad():
            if inplace:
                return output.mul_(scale if same else scale.to(dtype))
            return (output.to(dtype) * scale.to(dtype)).to(output.dtype)


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
    cache = _ScaleCache(model, [s.size for s in slots], config.degree)
    state.handles.append(model.register_forward_pre_hook(cache.invalidate))
    modules = dict(targets)
    for index, slot in enumerate(slots):
        module = modules[slot.name]
        state.handles.append(module.register_forward_hook(_ScaleHook(cache, index)))
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
