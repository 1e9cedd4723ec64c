"""Writing the merged model: each base shard folded and saved in turn, then the index, config and
side files. Peak memory is about one shard (``safetensors.safe_open`` reads one tensor at a time).

Output dtype: every tensor keeps the base checkpoint's stored dtype (bf16 stays bf16) unless
``dtype`` is given, which casts every floating tensor (after the fold, done in fp32).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from propulsion_ds.errors import MergeError
from propulsion_ds.method.scale import fold
from propulsion_ds.tools.merge_plan import INDEX_FILE, Scale, _Plan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _scaled(t: torch.Tensor, s: Scale, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The folded tensor in ``dtype`` (default: its stored dtype); the fold itself in fp32+."""
    out = t.dtype if dtype is None else dtype
    src = t if s.replace is None else s.replace
    if dtype is not None or s.replace is not None:
        src = src.to(torch.promote_types(src.dtype, out))       # never round before the fold
    return fold(src, s.scale, s.axis).to(out).contiguous()


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype).contiguous()


def _write_shard(src: Path, dst: Path, plan: _Plan, dtype: torch.dtype | None = None) -> tuple[int, int, list]:
    """Scale one shard into ``dst``; returns (bytes written, tensors scaled, keys written)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, nscaled = {}, 0
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            t = f.get_tensor(key)
            if key == plan.untie_from:
                head = _cast(t.clone(), dtype)
                if plan.untie_scale is not None:
                    head = _scaled(t, plan.untie_scale, dtype)
                    nscaled += 1
                out[plan.untie_to] = head
            if key in plan.scales:
                t = _scaled(t, plan.scales[key], dtype)
                nscaled += 1
            out[key] = _cast(t, dtype)
    metadata.setdefault("format", "pt")
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    save_file(out, str(dst), metadata=metadata)
    return nbytes, nscaled, list(out)


def write_shards(shards: list, index: dict | None, tmp: Path, plan: _Plan, dtype, progress: bool) -> tuple[int, int]:
    """Every shard folded into ``tmp``, and the rewritten index; returns (bytes, tensors scaled)."""
    from tqdm.auto import tqdm

    total_bytes, nscaled, weight_map = 0, 0, {}
    for shard in tqdm(shards, desc="merging", unit="shard", disable=not progress):
        nb, ns, written = _write_shard(shard, tmp / shard.name, plan, dtype)
        total_bytes += nb
        nscaled += ns
        weight_map.update({k: shard.name for k in written})
    expected = len(plan.scales) + (plan.untie_scale is not None)
    if nscaled != expected:
        raise MergeError(f"scaled {nscaled} tensors, expected {expected}: the checkpoint's shards "
                         f"do not match its index")
    if index is not None:
        new_index = {"metadata": {**(index.get("metadata") or {}), "total_size": total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2) + "\n")
    return total_bytes, nscaled


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _untie(cfg: dict) -> None:
    cfg["tie_word_embeddings"] = False
    for sub in ("text_config", "llm_config"):
        if isinstance(cfg.get(sub), dict) and "tie_word_embeddings" in cfg[sub]:
            cfg[sub]["tie_word_embeddings"] = False


def write_side_files(base: Path, dst: Path, untie: bool, dtype: torch.dtype | None) -> list:
    """Copy config.json, generation_config.json, tokenizer and other small files; untie and set
    ``dtype`` in the copied config.json as asked. Returns the names copied."""
    copied = []
    for p in sorted(base.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(".index.json") \
                or p.suffix.lower() in WEIGHT_SUFFIXES:
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    if untie:
        _edit_config(dst / "config.json", _untie)
    if dtype is not None:
        def set_dtype(cfg):
            for key in ("dtype", "torch_dtype"):
                if key in cfg or key == "dtype":
                    cfg[key] = dtype_name(dtype)
        _edit_config(dst / "config.json", set_dtype)
    return copied


def stored_dtypes(headers: dict) -> list:
    """The floating dtype names (e.g. "bfloat16") the checkpoint stores, sorted."""
    return sorted({SAFETENSORS_DTYPES[d] for _, d in headers.values() if d in SAFETENSORS_DTYPES})
