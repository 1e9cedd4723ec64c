"""The trained vectors out of the engine: gathered in fp32 and written as adapter/ by rank 0."""
from __future__ import annotations

from pathlib import Path

import torch

from propulsion_ds.collective import rank0_write
from propulsion_ds.method.adapter import gathered, save_adapter, trained_biases
from propulsion_ds.method.propulsion import DELTA_NAME


def full_delta(model) -> torch.Tensor:
    """Collective: the vectors in fp32, DeepSpeed's master copy where it keeps one."""
    from deepspeed.utils import safe_get_full_fp32_param

    p = getattr(model, DELTA_NAME)
    full = safe_get_full_fp32_param(p)
    if full is None:
        with gathered([p]):
            full = p.detach().float().clone()
    return full.float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def write_adapter(model, out: Path, step: int) -> torch.Tensor:
    """Collective; rank 0 writes adapter/ (temp file + rename, so never torn). Returns the delta."""
    delta = full_delta(model)
    biases = trained_biases(model)              # collective; {} without train_bias
    rank0_write(lambda: save_adapter(model, out / "adapter", delta=delta, biases=biases),
                f"could not write the adapter under {out / 'adapter'}", out,
                f"; checkpoint step_{step} is complete: resume with --resume",
                # safetensors reports a full disk in its own exception type
                catch=(Exception,))
    return delta
