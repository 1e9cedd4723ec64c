"""Throughput, memory and Propulsion statistics for the logs."""
from __future__ import annotations

import re
import resource
import sys

import torch

LAYER = re.compile(r"\.(\d+)\.")


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def flops_per_token(n_params: int, trainable_weights: bool = False) -> float:
    """Forward 2N; backward 2N for activation gradients, plus 2N more only if weights train."""
    return (6.0 if trainable_weights else 4.0) * n_params


def estimate_mfu(n_params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """nanoGPT-style model FLOPs utilisation; None where the peak is unknown (CPU)."""
    if not peak_flops:
        return None
    return flops_per_token(n_params) * tokens_per_s / peak_flops


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def gpu_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)


def layer_of(module_name: str) -> str:
    m = LAYER.search(module_name)
    return f"layer_{int(m.group(1)):03d}" if m else module_name.replace(".", "_")


def propulsion_stats(scales: dict) -> tuple[dict, torch.Tensor]:
    """Per-layer mean |z**k - 1| and all z**k values (for a histogram)."""
    groups: dict[str, list] = {}
    for name, s in scales.items():
        groups.setdefault(layer_of(name), []).append((s.float() - 1).abs())
    per_layer = {k: torch.cat(v).mean().item() for k, v in groups.items()}
    values = torch.cat([s.float().flatten() for s in scales.values()])
    return per_layer, values
