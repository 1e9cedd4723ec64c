"""Propulsion (arXiv 2409.10927): y' = y * z**k per output channel of each targeted frozen module.

Layout (DESIGN §3): one flat trainable offset ``delta`` of shape ``(num_vectors, total_d_out)``
is registered on the root model as ``propulsion_delta`` (z = 1 + delta); a forward hook on each
targeted module slices its channels. No wrapper modules and one tensor in all, because under
ZeRO-3 every extra module and tensor costs bookkeeping on every step. ZeRO gathers the root's
parameters for the whole forward and backward, so every slice reads gathered data.

Scale: every target hook computes its own ``mean_i (1 + delta[i, lo:hi])**k`` from the delta as
it is at that call (``_Propel``). Nothing is cached between hooks or calls, so no scale is ever
stale: a submodule called on its own, an in-place or ``.data`` write to the delta, two backward
passes, gradient accumulation and reentrant / non-reentrant activation checkpointing all see the
current delta.

Multi-propulsion (``num_vectors = n > 1``, paper appendix F: ``s = mean_i z_i**k``): the vectors
start at z_i**k = 1 + c_i with c_i evenly spaced in [-0.1, 0.1] (n = 4: -0.1, -0.033, 0.033, 0.1;
the same for every channel), so mean_i z_i**k = 1 and step 0 is the base model. The pairs
(i, n-1-i) are picked among neighbouring representable values so the fp32 scales the hook
computes sum to 2 as closely as fp32 allows: the step-0 scale is within a few fp32 ulps of 1
(guaranteed), and for n = 4, k = 7 and 15 it is exactly 1 and the logits are bit-identical to
the base on this project's CPUs (fp32 and bf16, the 7 test architectures; measured, not
guaranteed: another device's pow or summation order may round differently). Starting all n vectors at ones
would give them the same gradient for ever, and n = 4 would train exactly like n = 1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

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


def scale_from_delta(delta: torch.Tensor, degree: int) -> torch.Tensor:
    """Channel scale mean_i (1 + delta_i)**k from a (n, d) offset (DESIGN §1 Numerics).

    Computed in fp32, or in float64 for a float64 delta (never below the delta's precision).
    """
    z = 1.0 + delta.to(torch.promote_types(delta.dtype, torch.float32))
    if z.shape[0] == 1:
        return z[0] ** degree
    return (z ** degree).mean(0)


class _Propel(torch.autograd.Function):
    """y' = y * s with s = mean_i (1 + d_i)**k, d = delta[:, lo:hi] (a view), one node per target.

    The scale is computed here, from the delta as it is at this call, by every target on every
    call: nothing is cached, so a submodule called on its own, a delta written in place (also
    through ``.data``, which autograd's version counter cannot see), a second backward, gradient
    accumulation and both kinds of activation checkpointing all read the current delta. One
    Python node per target (autograd's slice backward, in C++, scatters the slice's gradient into
    the whole delta) keeps the per-target cost to a few small kernels (DESIGN §3).

    y in the working dtype (``promote(y.dtype, s.dtype)``, i.e. fp32 y with an fp32 scale) is
    scaled IN PLACE and only y' is saved (often shared with what the next op saves anyway:
    silu(gate), up * ..., v in attention); backward recovers sum(g * y) as sum(g * y') / s. That is
    exact for any normal, finite s; a degenerate channel (|z**k| below ~1e-30, or inf/nan) gives a
    non-finite gradient, which the trainer's NaN guard turns into a skipped step, never a silent
    wrong update. Otherwise (a bf16 y) y' is a new tensor and y is saved in its own dtype.
    Also saved: z = 1 + d (n x d_out, tiny), for the delta's gradient.
    """

    @staticmethod
    def forward(ctx, y, d, degree, inplace):
        z = (d if d.dtype == torch.float32 or d.dtype == torch.float64 else d.float()) + 1.0
        s = z ** degree if z.shape[0] == 1 else (z ** degree).mean(0, keepdim=True)   # (1, d_out)
        if s.dtype != y.dtype and torch.promote_types(y.dtype, s.dtype) != s.dtype:
            s = s.to(torch.promote_types(y.dtype, s.dtype))
        ctx.degree, ctx.y_dtype = degree, y.dtype
        ctx.inplace = inplace = inplace and y.dtype == s.dtype
        if inplace:
            ctx.mark_dirty(y)
            y.mul_(s)
            ctx.save_for_backward(y, s, z)
            return y
        ctx.save_for_backward(y, s, z)
        return y * s if y.dtype == s.dtype else (y.to(s.dtype) * s).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, s, z = ctx.saved_tensors
        if grad.dtype != s.dtype:
            grad = grad.to(s.dtype)
        grad_y = grad_d = None
        if ctx.needs_input_grad[0]:
            grad_y = grad * s
            if ctx.y_dtype != s.dtype:
                grad_y = grad_y.to(ctx.y_dtype)
        if ctx.needs_input_grad[1]:
            k, n = ctx.degree, z.shape[0]
            gy = (grad * (y if y.dtype == s.dtype else y.to(s.dtype))).flatten(0, -2).sum(0)
            # d s / d z_i = k z_i**(k-1) / n; with y' = y s saved, sum(g y) = sum(g y') / s, and
            # for n = 1 z**(k-1) / s = 1 / z: grad = sum(g y') * k / z (two small kernels).
            if ctx.inplace and n == 1:
                grad_d = (gy * k).to(z.dtype) / z
            else:
                if ctx.inplace:
                    gy = gy / s
                grad_d = gy.to(z.dtype) * (k * z ** (k - 1) if k > 1 else torch.ones_like(z))
                if n > 1:
                    grad_d = grad_d / n
        return grad_y, grad_d, None, None


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


MULTI_SPREAD = 0.1     # multi-propulsion: z_i**k starts at 1 + c_i, c_i evenly spaced in [-0.1, 0.1]


def multi_offsets(num_vectors: int) -> list:
    """c_i = MULTI_SPREAD * (2i - (n-1)) / (n-1): symmetric about 0, so sum_i c_i = 0 exactly."""
    if num_vectors == 1:
        return [0.0]
    return [MULTI_SPREAD * (2 * i - (num_vectors - 1)) / (num_vectors - 1) for i in range(num_vectors)]


def _grid(target: float, dtype, half_width: int) -> torch.Tensor:
    """Distinct ``dtype`` values near ``target`` whose 1 + d differ in fp32 (the hook's z)."""
    step = max(abs(target) * torch.finfo(dtype).eps, torch.finfo(torch.float32).eps / 2)
    raw = torch.tensor(target, dtype=torch.float64) + step * torch.arange(-half_width, half_width + 1,
                                                                           dtype=torch.float64)
    return torch.unique(raw.to(dtype))


def initial_delta(num_vectors: int, size: int, degree: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The delta at step 0, (num_vectors, size): zeros for n = 1; for n > 1 row i holds
    d_i ~ ``(1 + c_i)**(1/k) - 1`` so that z_i**k ~ 1 + c_i and mean_i z_i**k = 1 (the base model).

    n equal vectors would get equal gradients and stay equal for ever (n = 4 would train exactly
    like n = 1); distinct starting points break that symmetry while the model still starts as
    the base model. Rounding: rows i and n-1-i are chosen together, among the ``dtype`` values
    next to their targets, so that the two scales the hook computes (``(1 + d.float())**k``) sum
    to 2 as closely as fp32 allows; the middle row of an odd n is exactly 0. In fp32 the hook's
    mean is then 1 within a few ulps (tests/test_multi_propulsion.py). Every channel gets the same
    offsets: deterministic, the same on every rank, no RNG draw.
    """
    if num_vectors == 1 or size == 0 or str(device) == "meta":
        return torch.zeros(num_vectors, size, dtype=dtype, device=device)
    c = multi_offsets(num_vectors)
    work = torch.promote_types(dtype, torch.float32)
    rows = [torch.zeros((), dtype=dtype)] * num_vectors
    for i in range(num_vectors // 2):
        j = num_vectors - 1 - i
        di = _grid((1.0 + c[i]) ** (1.0 / degree) - 1.0, dtype, 24)
        pi = ((1.0 + di.to(work)) ** degree).double()                  # what the hook computes
        best = None
        for a in range(di.numel()):
            dj = _grid(float((2.0 - pi[a]) ** (1.0 / degree) - 1.0), dtype, 3)
            pj = ((1.0 + dj.to(work)) ** degree).double()
            r = (pi[a] + pj - 2.0).abs()
            b = int(r.argmin())
            if best is None or r[b] < best[0]:
                best = (r[b], di[a], dj[b])
        rows[i], rows[j] = best[1], best[2]
    return torch.stack(rows)[:, None].expand(num_vectors, size).contiguous().to(device)


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
    """{module name: fp32 z**k (or mean of powers)} on the delta's device; delta must be whole."""
    state = _require_state(model)
    delta = getattr(model, DELTA_NAME) if delta is None else delta
    full = scale_from_delta(delta.detach(), state.config.degree)
    return {s.name: full[s.offset:s.offset + s.size] for s in state.slots}


def fold(tensor: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` with ``scale`` (one value per output channel) folded in along ``axis``.

    The one fold of both merges (``merge_and_unload`` and the streaming ``merge.merge``):
    W' = s[:, None] W (nn.Linear, axis 0), W' = W s[None, :] (Embedding, Conv1D: axis -1),
    b' = s b (axis 0). Computed in fp32 (float64 for float64 tensors), returned in ``tensor``'s
    dtype: a bf16 weight is rounded once, after the product.
    """
    shape = [1] * tensor.dim()
    shape[axis] = -1
    dt = torch.promote_types(tensor.dtype, torch.float32)
    return (tensor.to(dt) * scale.to(dt).reshape(shape)).to(tensor.dtype)


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
