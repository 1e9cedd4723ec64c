"""The objective's pieces: per-token loss sums and target counts (docs/DESIGN.md "Training arithmetic")."""
from __future__ import annotations

import torch

from propulsion_ds.data.pack import attn_implementation, model_inputs


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the next-token cross-entropy, in fp32 (labels aligned with inputs)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def target_tokens(batch: dict) -> float:
    return float((batch["labels"][:, 1:] != -100).sum())


def forward_loss_sum(engine, batch: dict) -> torch.Tensor:
    """Sum of the per-token losses of one micro-batch (fp32), not their mean."""
    # a packed batch is one flattened row for the flash kernels (data/pack.py: model_inputs)
    inputs = model_inputs(batch, attn_implementation(engine))
    labels = inputs["labels"]
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    # use_cache=False: a cache switches off transformers' packed-document isolation.
    out = engine(**inputs, use_cache=False)
    return token_loss_sum(out.logits, labels)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
