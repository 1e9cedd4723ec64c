"""Where multi-propulsion starts (``num_vectors = n > 1``, paper appendix F: ``s = mean_i z_i**k``).

The vectors start at z_i**k = 1 + c_i with c_i evenly spaced in [-0.1, 0.1] (n = 4: -0.1, -0.033,
0.033, 0.1; the same for every channel), so mean_i z_i**k = 1 and step 0 is the base model. The
pairs (i, n-1-i) are picked among neighbouring representable values so the fp32 scales the hook
computes sum to 2 as closely as fp32 allows: the step-0 scale is within a few fp32 ulps of 1
(guaranteed), and for n = 4, k = 7 and 15 it is exactly 1 and the logits are bit-identical to
the base on this project's CPUs (fp32 and bf16, the 7 test architectures; measured, not
guaranteed: another device's pow or summation order may round differently). Starting all n
vectors at ones would give them the same gradient for ever, and n = 4 would train exactly like
n = 1.
"""
from __future__ import annotations

import torch


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
