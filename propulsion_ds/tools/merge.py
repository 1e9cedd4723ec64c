"""Offline merge: fold a Propulsion adapter into a base checkpoint, one safetensors shard at a time.

For every adapter target with channel scale ``s = z**k`` (fp32; the mean of powers when the adapter
has several vectors per module), the merged weights are (DESIGN §1):

    nn.Linear  weight (out, in)   W' = s[:, None] * W        bias b' = s * b
    Conv1D     weight (in, out)   W' = W * s[None, :]        bias b' = s * b   (GPT-2)
    Embedding  weight (num, dim)  E' = E * s[None, :]

computed in fp32 by ``propulsion.fold`` (the same fold as ``merge_and_unload``). With
``train_bias`` the adapter's trained bias replaces the checkpoint's before the fold:
b' = s * trained_b. Output dtype: every tensor keeps the base checkpoint's stored dtype (bf16
stays bf16) unless ``dtype`` is given, which casts every floating tensor (after the fold, done in
fp32) and sets ``dtype`` in config.json. Module types come from the model built on the
``meta`` device from the base ``config.json`` (no weights); the tensor of module ``a.b.c`` is
``a.b.c.weight``. Shards are read with ``safetensors.safe_open`` and written one by one, so the
peak memory is about one shard. ``model.safetensors.index.json`` is rewritten; config.json,
generation_config.json, tokenizer and other small files are copied. A tied input-embedding /
lm_head pair whose either side is scaled is refused unless ``untie=True``, which writes a separate
``lm_head.weight`` and sets ``tie_word_embeddings`` false. The result is a plain transformers
directory: ``AutoModelForCausalLM.from_pretrained(out)`` loads it without propulsion_ds.

Everything is written to a temporary sibling of ``out`` and renamed into place at the end, after
the optional check that the merged model's logits equal the base model with the adapter.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from propulsion_ds.method.adapter import (BIAS_SUFFIX, CONFIG_FILE, KEY_SUFFIX, AdapterError, injected_skeleton,
                      read_adapter_config, read_adapter_weights)
from propulsion_ds.fsutil import replace_dir
from propulsion_ds.method.propulsion import PropulsionConfig, fold, get_state, scale_from_delta
from propulsion_ds.errors import MergeError, VerificationError  # noqa: F401

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
VERIFY_MAX_BYTES = 2 * 2 ** 30          # verification is on by default below 2 GiB of weights
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5}   # max |diff| / max |logit|
TOLERANCE_16BIT = 2e-2                  # bf16/fp16: the merged weight is rounded once more




@dataclass
class Scale:
    key: str                 # the tensor in the checkpoint
    scale: torch.Tensor      # fp32, (d_out,)
    axis: int                # the output-channel axis of that tensor
    replace: torch.Tensor | None = None   # the adapter's trained bias, folded instead of the stored one


@dataclass
class MergeResult:
    out: Path
    shards: int
    scaled_tensors: int
    untied: bool
    total_bytes: int
    max_rel_err: float | None = None
    files_copied: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)    # floating dtypes written, e.g. ["bfloat16"]
    dtype_from: str = "base checkpoint"           # or "dtype argument"
    trained_biases: int = 0                       # biases taken from the adapter (train_bias)


# --------------------------------------------------------------------------- inputs
def _header(path: Path) -> dict:
    """{key: (shape, dtype)} of one safetensors file, reading its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_files(base: Path) -> tuple[list[Path], dict | None]:
    """The base model's shards in order, and its index (None for a single file)."""
    index_path = base / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise MergeError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise MergeError(f"{index_path} names shard {missing[0]!r}, which is not in {base}")
        return [base / n for n in sorted(names)], index
    if (base / SINGLE_FILE).is_file():
        return [base / SINGLE_FILE], None
    if any(base.glob("*.bin")) or any(base.glob("*.pt")):
        raise MergeError(f"{base} holds PyTorch .bin weights; only safetensors checkpoints are "
                         f"merged (re-save the model with save_pretrained(safe_serialization=True))")
    raise MergeError(f"{base} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors model directory")


def _find_key(name: str, suffix: str, keys, prefix: str) -> str | None:
    """The checkpoint key of ``name.suffix``; tolerates a checkpoint saved with/without the
    model's base_model_prefix (e.g. GPT-2's "h.0..." vs "transformer.h.0...")."""
    candidates = [f"{name}.{suffix}"]
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.{suffix}")
        else:
            candidates.append(f"{prefix}.{name}.{suffix}")
    return next((c for c in candidates if c in keys), None)


def adapter_scales(meta: dict, weights: dict, slots) -> tuple[dict, dict]:
    """({module: fp32 scale}, {module: fp32 trained bias}) from an adapter's saved tensors.

    The scale is ``propulsion.scale_from_delta(z - 1)``, the training hook's own formula
    (z - 1 and 1 + (z - 1) are exact in fp32 for z in [0.5, 2], so this is z**k bit for bit).
    """
    config = PropulsionConfig(**meta["propulsion"])
    n, k = config.num_vectors, config.degree
    scales, biases = {}, {}
    for slot in slots:
        key = slot.name + KEY_SUFFIX
        if key not in weights:
            raise AdapterError(f"adapter is missing key {key!r}")
        z = weights[key]
        if tuple(z.shape) != ((slot.size,) if n == 1 else (n, slot.size)):
            raise AdapterError(f"adapter key {key!r} has shape {tuple(z.shape)}, the model expects "
                               f"{(slot.size,) if n == 1 else (n, slot.size)}")
        scales[slot.name] = scale_from_delta(z.float().reshape(n, slot.size) - 1.0, k)
        if slot.name + BIAS_SUFFIX in weights:
            biases[slot.name] = weights[slot.name + BIAS_SUFFIX].float()
    known = {s + KEY_SUFFIX for s in scales} | {b + BIAS_SUFFIX for b in biases}
    extra = [key for key in weights if key not in known]
    if extra:
        raise AdapterError(f"adapter has unexpected key {extra[0]!r}")
    return scales, biases


@dataclass
class _Plan:
    scales: dict             # checkpoint key -> Scale
    untie_from: str | None   # embedding key to copy into the new lm_head key
    untie_to: str | None
    untie_scale: Scale | None = None
    untie_config: bool = False   # set tie_word_embeddings false in the output config


def plan_merge(base: Path, adapter: Path, headers: dict, *, untie: bool,
               trust_remote_code: bool = False) -> _Plan:
    """Which tensors to scale, along which axis, and what untying adds. Reads no weights."""
    from propulsion_ds.method.targets import is_conv1d

    meta = read_adapter_config(adapter)
    try:
        pcfg = PropulsionConfig(**meta["propulsion"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{adapter / CONFIG_FILE}: bad 'propulsion' section ({e})") from None
    model = injected_skeleton(base, meta, pcfg, trust_remote_code)
    state = get_state(model)
    scales, biases = adapter_scales(meta, read_adapter_weights(adapter), state.slots)
    modules = dict(model.named_modules())
    if pcfg.train_bias:
        want = [s.name for s in state.slots if getattr(modules[s.name], "bias", None) is not None]
        missing = [n for n in want if n not in biases]
        if missing:
            raise AdapterError(f"adapter was trained with train_bias=true but holds no trained bias "
                               f"{missing[0] + BIAS_SUFFIX!r}: it was written before propulsion_ds "
                               f"saved biases, so merging it would drop them")

    keys = set(headers)
    prefix = getattr(model, "base_model_prefix", "") or ""
    scaled = {s.name for s in state.slots}

    # A tied input embedding / lm_head pair: one tensor in the checkpoint, two roles.
    result = _Plan({}, None, None)
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    head_name = None
    if inp is not None and outp is not None and inp.weight is outp.weight:
        names = {id(m): n for n, m in model.named_modules()}
        emb_name, head_name = names[id(inp)], names[id(outp)]
        if emb_name in scaled or head_name in scaled:
            if not untie:
                raise MergeError(
                    "the input embedding and lm_head share one weight (tie_word_embeddings) and "
                    "the adapter scales one of them: merging would change both. Pass --untie to "
                    "write a separate lm_head weight")
            result.untie_config = True
            if _find_key(head_name, "weight", keys, prefix) is None:   # the usual tied checkpoint
                emb_key = _find_key(emb_name, "weight", keys, prefix)
                if emb_key is None:
                    raise MergeError(f"the base checkpoint has no tensor {emb_name}.weight")
                result.untie_from = emb_key
                result.untie_to = f"{head_name}.weight"
                if head_name in scaled:
                    result.untie_scale = Scale(result.untie_to, scales[head_name], 0)

    for slot in state.slots:
        module = modules[slot.name]
        axis = -1 if isinstance(module, nn.Embedding) or is_conv1d(module) else 0
        for suffix in ("weight", "bias"):
            if suffix == "bias" and getattr(module, "bias", None) is None:
                continue
            if suffix == "weight" and slot.name == head_name and result.untie_to is not None:
                continue                      # written from the embedding, see untie_scale
            key = _find_key(slot.name, suffix, keys, prefix)
            if key is None:
                raise MergeError(f"the base checkpoint has no tensor {slot.name}.{suffix} for "
                                 f"adapter target {slot.name!r}")
            shape = headers[key][0]
            ax = axis if suffix == "weight" else 0
            if len(shape) <= max(ax, 0) or shape[ax] != slot.size:
                raise MergeError(f"base tensor {key!r} has shape {list(shape)}, adapter target "
                                 f"{slot.name!r} has {slot.size} channels: the adapter was made "
                                 f"for another model")
            replace = None
            if suffix == "bias" and slot.name in biases:
                replace = biases[slot.name]
                if tuple(replace.shape) != tuple(shape):
                    raise AdapterError(f"adapter key {slot.name + BIAS_SUFFIX!r} has shape "
                                       f"{tuple(replace.shape)}, base tensor {key!r} has {tuple(shape)}")
            result.scales[key] = Scale(key, scales[slot.name], ax, replace)
    return result


# --------------------------------------------------------------------------- output
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

    out, nbytes, nscaled = {}, 0, 0
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


def _untie_config(path: Path) -> None:
    cfg = json.loads(path.read_text())
    cfg["tie_word_embeddings"] = False
    for sub in ("text_config", "llm_config"):
        if isinstance(cfg.get(sub), dict) and "tie_word_embeddings" in cfg[sub]:
            cfg[sub]["tie_word_embeddings"] = False
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _copy_side_files(base: Path, dst: Path) -> list:
    copied = []
    for p in sorted(base.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(".index.json") \
                or p.suffix.lower() in WEIGHT_SUFFIXES:
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


# --------------------------------------------------------------------------- verification
def verify_merge(base, adapter, merged, *, num_tokens: int = 12, seed: int = 0,
                 trust_remote_code: bool = False) -> float:
    """max |logits(merged) - logits(base+adapter)| / max |logits(base+adapter)| on a few tokens.

    Both models are loaded with transformers in fp32 (the stored weights are upcast), so the only
    difference is the rounding of the merged weights to their stored dtype.
    """
    from transformers import AutoModelForCausalLM

    from propulsion_ds.method.adapter import load_adapter

    from transformers.utils import logging as hf_logging

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


# --------------------------------------------------------------------------- entry
def merge(base, adapter, out, *, untie: bool = False, verify: bool | None = None,
          progress: bool = False, overwrite: bool = False,
          trust_remote_code: bool = False, dtype=None) -> MergeResult:
    """Merge ``adapter`` into the model at ``base`` and write a plain model directory ``out``.

    ``dtype``: None keeps every tensor's stored dtype (the base checkpoint's: bf16 stays bf16);
    a torch dtype or "fp32" / "bf16" / "fp16" casts every floating tensor to it.
    ``verify``: None = on when the base weights are under 2 GiB; True/False forces it.
    ``overwrite``: replace an existing non-empty ``out`` (only once the new one is complete).
    Raises MergeError / AdapterError (nothing is left at ``out``), VerificationError.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MergeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if not base.is_dir():
        raise MergeError(f"base model directory not found: {str(base)!r}")
    if not (base / "config.json").is_file():
        raise MergeError(f"{base} has no config.json: not a transformers model directory")
    if not adapter.is_dir():
        raise MergeError(f"adapter directory not found: {str(adapter)!r}")
    for other, what in ((base, "base"), (adapter, "adapter")):
        if out.resolve() == other.resolve() or out.resolve() in other.resolve().parents:
            raise MergeError(f"--out must differ from (and not contain) the {what} directory")
    if out.exists() and not out.is_dir():
        raise MergeError(f"output {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output {str(out)!r} exists and is not an empty directory; "
                         f"choose a new --out or pass --overwrite")

    shards, index = checkpoint_files(base)
    headers = {}
    for shard in shards:
        headers.update(_header(shard))
    plan = plan_merge(base, adapter, headers, untie=untie, trust_remote_code=trust_remote_code)
    total_in = sum(s.stat().st_size for s in shards)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
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
        copied = _copy_side_files(base, tmp)
        untied = plan.untie_config
        if untied:
            _untie_config(tmp / "config.json")
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        stored = {SAFETENSORS_DTYPES.get(d, d) for _, d in headers.values() if d in SAFETENSORS_DTYPES}
        written_dtypes = sorted(stored) if dtype is None else [str(dtype).replace("torch.", "")]

        rel = None
        if verify is None:
            verify = total_in < VERIFY_MAX_BYTES
        if verify:
            rel = verify_merge(base, adapter, tmp, trust_remote_code=trust_remote_code)
            scaled = {SAFETENSORS_DTYPES.get(headers[s.key][1]) for s in plan.scales.values()}
            if dtype is not None:
                scaled = {str(dtype).replace("torch.", "")}
            tol = 1e-5 if scaled <= {"float32", "float64"} else TOLERANCE_16BIT
            if not rel <= tol:
                raise VerificationError(f"merged model's logits differ from base+adapter by {rel:.3g} "
                                        f"(relative, tolerance {tol:g}); nothing was written to {out}")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out=out, shards=len(shards), scaled_tensors=nscaled, untied=untied,
                       total_bytes=total_bytes, max_rel_err=rel, files_copied=copied,
                       dtypes=written_dtypes,
                       dtype_from="base checkpoint" if dtype is None else "dtype argument",
                       trained_biases=sum(sc.replace is not None for sc in plan.scales.values()))
