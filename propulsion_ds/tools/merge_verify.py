"""The optional check that a merged model computes what base + adapter computes."""
from __future__ import annotations

from pathlib import Path

import torch

from propulsion_ds.errors import VerificationError
from propulsion_ds.tools.merge_write import SAFETENSORS_DTYPES, dtype_name

VERIFY_MAX_BYTES = 2 * 2 ** 30          # verification is on by default below 2 GiB of weights
TOLERANCE_32BIT = 1e-5                  # max |diff| / max |logit|, fp32/fp64 weights
TOLERANCE_16BIT = 2e-2                  # bf16/fp16: the merged weight is rounded once more


def verify_merge(base, adapter, merged, *, num_tokens: int = 12, seed: int = 0,
                 trust_remote_code: bool = False) -> float:
    """max |logits(merged) - logits(base+adapter)| / max |logits(base+adapter)| on a few tokens.

    Both models are loaded with transformers in fp32 (the stored weights are upcast), so the only
    difference is the rounding of the merged weights to their stored dtype.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from propulsion_ds.method.adapter import load_adapter

    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()           # one bar per load is noise next to ours
    try:
        ref = AutoModelForCausalLM.from_pretrained(str(base), **kw).eval()
        load_adapter(ref, adapter)
        new = AutoModelForCausalLM.from_pretrained(str(merged), **kw).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    vocab = ref.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, num_tokens), generator=g)
    with torch.no_grad():
        a = ref(input_ids=ids).logits.float()
        b = new(input_ids=ids).logits.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def check_merge(base: Path, adapter: Path, merged: Path, out: Path, scaled_dtypes: set,
                trust_remote_code: bool) -> float:
    """``verify_merge``, raising VerificationError beyond the tolerance of the scaled tensors'
    dtypes (a set of names, as ``SAFETENSORS_DTYPES`` gives them); returns the difference."""
    rel = verify_merge(base, adapter, merged, trust_remote_code=trust_remote_code)
    tol = TOLERANCE_32BIT if scaled_dtypes <= {"float32", "float64"} else TOLERANCE_16BIT
    if not rel <= tol:
        raise VerificationError(f"merged model's logits differ from base+adapter by {rel:.3g} "
                                f"(relative, tolerance {tol:g}); nothing was written to {out}")
    return rel


def scaled_dtypes(plan, headers: dict, dtype: torch.dtype | None) -> set:
    """The dtypes the scaled tensors are written in (what the tolerance depends on)."""
    if dtype is not None:
        return {dtype_name(dtype)}
    return {SAFETENSORS_DTYPES.get(headers[s.key][1]) for s in plan.scales.values()}
