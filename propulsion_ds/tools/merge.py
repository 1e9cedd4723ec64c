"""Offline merge: fold a Propulsion adapter into a base checkpoint, one safetensors shard at a time.

For every adapter target with channel scale ``s = z**k`` (fp32; the mean of powers when the adapter
has several vectors per module), the merged weights are (docs/DESIGN.md "The method"):

    nn.Linear  weight (out, in)   W' = s[:, None] * W        bias b' = s * b
    Conv1D     weight (in, out)   W' = W * s[None, :]        bias b' = s * b   (GPT-2)
    Embedding  weight (num, dim)  E' = E * s[None, :]

computed in fp32 by ``scale.fold`` (the same fold as ``merge_and_unload``) from the scales of
``propulsion.channel_scales`` (the same as training's). With ``train_bias`` the adapter's trained
bias replaces the checkpoint's before the fold: b' = s * trained_b. Output dtype: every tensor
keeps the base checkpoint's stored dtype (bf16 stays bf16) unless ``dtype`` is given, which casts
every floating tensor (after the fold) and sets ``dtype`` in config.json.
``model.safetensors.index.json`` is rewritten; config.json, generation_config.json, tokenizer and
other small files are copied. A tied input-embedding / lm_head pair whose either side is scaled is
refused unless ``untie=True``, which writes a separate ``lm_head.weight`` and sets
``tie_word_embeddings`` false. The result is a plain transformers directory:
``AutoModelForCausalLM.from_pretrained(out)`` loads it without propulsion_ds.

Everything is written to a temporary sibling of ``out`` and renamed into place at the end, after
the optional check that the merged model's logits equal the base model with the adapter.
The steps live in ``merge_plan`` (what to scale), ``merge_write`` (the shards and side files) and
``merge_verify`` (the logits check); this module checks the arguments and runs them in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from propulsion_ds.errors import MergeError
from propulsion_ds.model import DTYPES as MODEL_DTYPES
from propulsion_ds.tools.merge_plan import checkpoint_files, plan_merge, read_header
from propulsion_ds.tools.merge_verify import VERIFY_MAX_BYTES, check_merge, scaled_dtypes
from propulsion_ds.tools.merge_write import dtype_name, stored_dtypes, write_shards, write_side_files
from propulsion_ds.tools.outdir import staged

# The config's short names (model.DTYPES: fp32, bf16, fp16) and torch's own (float32, ...).
DTYPES = {**MODEL_DTYPES, **{dtype_name(d): d for d in MODEL_DTYPES.values()}}


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


def _check_args(base: Path, adapter: Path, out: Path, overwrite: bool, dtype):
    """MergeError for unusable arguments, before anything is read; returns the torch dtype."""
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
    return dtype


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
    dtype = _check_args(base, adapter, out, overwrite, dtype)
    shards, index = checkpoint_files(base)
    headers = {}
    for shard in shards:
        headers.update(read_header(shard))
    plan = plan_merge(base, adapter, headers, untie=untie, trust_remote_code=trust_remote_code)
    if verify is None:
        verify = sum(s.stat().st_size for s in shards) < VERIFY_MAX_BYTES
    rel = None
    with staged(out) as tmp:
        total_bytes, nscaled = write_shards(shards, index, tmp, plan, dtype, progress)
        copied = write_side_files(base, tmp, plan.untie_config, dtype)
        if verify:
            rel = check_merge(base, adapter, tmp, out, scaled_dtypes(plan, headers, dtype), trust_remote_code)
    return MergeResult(out=out, shards=len(shards), scaled_tensors=nscaled, untied=plan.untie_config,
                       total_bytes=total_bytes, max_rel_err=rel, files_copied=copied,
                       dtypes=stored_dtypes(headers) if dtype is None else [dtype_name(dtype)],
                       dtype_from="base checkpoint" if dtype is None else "dtype argument",
                       trained_biases=sum(sc.replace is not None for sc in plan.scales.values()))
