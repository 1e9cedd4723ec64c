"""The numerics of Propulsion: the channel scale s = mean_i (1 + delta_i)**k, y' = y * s in the
forward (``_Propel``), and the fold of s into a weight (``fold``, used by both merges).

Everything here is a function of tensors only: no model, no state, so the training hook, the
in-memory merge, the streaming merge and the exports compute the very same values (docs/DESIGN.md "The method").
"""
from __future__ import annotations

import torch


def one_plus(delta: torch.Tensor) -> torch.Tensor:
    """z = 1 + delta in fp32, or in float64 for a float64 delta (never below the delta's precision)."""
    return 1.0 + delta.to(torch.promote_types(delta.dtype, torch.float32))


def power_mean(z: torch.Tensor, degree: int) -> torch.Tensor:
    """mean_i z_i**k over the rows of an (n, d) z, shape (d,); for n = 1 just z**k (no mean kernel)."""
    return z[0] ** degree if z.shape[0] == 1 else (z ** degree).mean(0)


def scale_from_delta(delta: torch.Tensor, degree: int) -> torch.Tensor:
    """Channel scale mean_i (1 + delta_i)**k from a (n, d) offset (docs/DESIGN.md "Numerics"): the one
    formula of the training hook, the merges and the exports (fp32, or float64 for float64)."""
    return power_mean(one_plus(delta), degree)


def fold(tensor: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` with ``scale`` (one value per output channel) folded in along ``axis``.

    The one fold of both merges (``propulsion.merge_and_unload`` and the streaming
    ``tools.merge.merge``):
    W' = s[:, None] W (nn.Linear, axis 0), W' = W s[None, :] (Embedding, Conv1D: axis -1),
    b' = s b (axis 0). Computed in fp32 (float64 for float64 tensors), returned in ``tensor``'s
    dtype: a bf16 weight is rounded once, after the product.
    """
    shape = [1] * tensor.dim()
    shape[axis] = -1
    dt = torch.promote_types(tensor.dtype, torch.float32)
    return (tensor.to(dt) * scale.to(dt).reshape(shape)).to(tensor.dtype)


class _Propel(torch.autograd.Function):
    """y' = y * s with s = mean_i (1 + d_i)**k, d = delta[:, lo:hi] (a view), one node per target.

    The scale is computed here, from the delta as it is at this call, by every target on every
    call: nothing is cached, so a submodule called on its own, a delta written in place (also
    through ``.data``, which autograd's version counter cannot see), a second backward, gradient
    accumulation and both kinds of activation checkpointing all read the current delta. One
    Python node per target (autograd's slice backward, in C++, scatters the slice's gradient into
    the whole delta) keeps the per-target cost to a few small kernels (docs/DESIGN.md "ZeRO-3 rules").

    y in the working dtype (``promote(y.dtype, s.dtype)``, i.e. fp32 y with an fp32 scale) is
    scaled IN PLACE and only y' is saved (often shared with what the next op saves anyway:
    silu(gate), up * ..., v in attention); backward recovers sum(g * y) as sum(g * y') / s. That is
    exact for any normal, finite s; a degenerate channel (|z**k| below ~1e-30, or inf/nan) gives a
    non-finite gradient, which the trainer's NaN guard turns into a skipped step, never a silent
    wrong update. Otherwise (a bf16 y) y' is a new bf16 tensor, saved the same way and shared the
    same way; sum(g * y') / s then carries y' 's bf16 rounding (2**-9 relative per element, the
    size of the rounding the incoming bf16 gradient g already has). An fp16 y saves y itself: y * s
    could underflow to 0 in fp16's range. docs/MEMORY.md: what each choice keeps per token.
    Also saved: z = 1 + d (n x d_out, tiny), for the delta's gradient.
    """

    @staticmethod
    def forward(ctx, y, d, degree, inplace):
        z = one_plus(d)
        s = power_mean(z, degree)                       # (d_out,), as scale_from_delta
        if s.dtype != y.dtype and torch.promote_types(y.dtype, s.dtype) != s.dtype:
            s = s.to(torch.promote_types(y.dtype, s.dtype))
        ctx.degree, ctx.y_dtype = degree, y.dtype
        ctx.inplace = inplace = inplace and y.dtype == s.dtype
        if inplace:
            ctx.saved_scaled = True
            ctx.mark_dirty(y)
            y.mul_(s)
            ctx.save_for_backward(y, s, z)
            return y
        out = y * s if y.dtype == s.dtype else (y.to(s.dtype) * s).to(y.dtype)
        # y' rather than y where sum(g y) = sum(g y') / s holds (fp16's narrow range could flush
        # y * s to 0): the ops after a target keep y' anyway (v in attention, silu(gate), up * ...)
        ctx.saved_scaled = torch.finfo(y.dtype).max > 1e38
        ctx.save_for_backward(out if ctx.saved_scaled else y, s, z)
        return out

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
            if ctx.saved_scaled and n == 1:
                grad_d = (gy * k).to(z.dtype) / z
            else:
                if ctx.saved_scaled:
                    gy = gy / s
                grad_d = gy.to(z.dtype) * (k * z ** (k - 1) if k > 1 else torch.ones_like(z))
                if n > 1:
                    grad_d = grad_d / n
        return grad_y, grad_d, None, None
