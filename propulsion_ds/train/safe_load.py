"""Reading ``.pt`` files with PyTorch's restricted unpickler, before anything else may unpickle them.

``torch.load(weights_only=True)`` allows tensors and plain containers; the few non-tensor classes
DeepSpeed's checkpoint files hold (its loss scalers, ZeRO stage enum, fragment addresses) and
numpy's RNG-state types are allowed by name. A file that references anything else is refused.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from propulsion_ds.collective import one_line
from propulsion_ds.errors import CheckpointError


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed's checkpoint files hold, and numpy's RNG state."""
    allowed = [np.ndarray, np.dtype, type(np.dtype("uint32"))]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:
        allowed.append(np.core.multiarray._reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path):
    """torch.load with PyTorch's restricted unpickler; a file that needs more raises CheckpointError."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors arrive as many types
        msg = one_line(e)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if m:
            msg = f"it references {m.group(1)}, which a checkpoint of plain tensors never does; refusing to unpickle"
        elif "weights only load failed" in msg.lower():
            msg = "not loadable with torch.load(weights_only=True)"
        raise CheckpointError(f"{path}: not a readable checkpoint file ({msg})") from None
