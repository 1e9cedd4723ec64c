"""Fold a Propulsion adapter into its base model: a plain transformers directory, no hooks.

    python launch/merge.py --base /models/llama-2-13b-hf --adapter out/run/adapter --out out/run/merged
    python launch/merge.py --base assets/stories260K --adapter out/tiny/adapter --out /tmp/merged --untie

W' = z**k[:, None] W for every targeted linear (bias too: z**k * b, with the adapter's trained
bias when it was trained with train_bias), E' = E z**k[None, :] for a targeted input embedding.
The merged model is written in the base checkpoint's dtype (bf16 stays bf16; the fold itself is
computed in fp32) unless --dtype says otherwise. Streams one safetensors shard at a time (peak
memory about one shard). A tied
embedding/lm_head pair is refused unless --untie. By default, for models under 2 GiB, the merged
model's logits are checked against base+adapter on a few tokens (--no-verify / --verify to choose).
Exit codes: 0 merged; 2 bad input (missing directories, an adapter for another model, tied
weights without --untie, a non-empty --out without --overwrite); 1 the verification failed (nothing is written).
"""
from __future__ import annotations

import argparse
import os
import sys

from launch.common import fail, one_line_errors, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory (safetensors, config.json)")
    p.add_argument("--adapter", required=True, help="adapter directory (propulsion.safetensors + propulsion_config.json)")
    p.add_argument("--out", required=True, help="new directory for the merged model (must not exist or be empty)")
    p.add_argument("--untie", action="store_true",
                   help="give lm_head its own weight when it is tied to a scaled input embedding")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--verify", dest="verify", action="store_true", default=None,
                   help="check logits against base+adapter (default: on below 2 GiB of weights)")
    v.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logits check")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the merged weights (default: the base checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (custom architectures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for what, path in (("--base", args.base), ("--adapter", args.adapter)):
        if not os.path.isdir(path):
            fail(f"{what}: directory not found: {path!r}")
    setup_logging()
    from propulsion_ds.tools.merge import merge

    with one_line_errors():
        result = merge(args.base, args.adapter, args.out, untie=args.untie, verify=args.verify,
                       progress=not args.no_progress, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    print(summary(result, args.dtype))
    return 0


def summary(result, dtype_arg) -> str:
    """The one line a successful merge prints."""
    check = "not verified" if result.max_rel_err is None else \
        f"verified: max relative logit difference {result.max_rel_err:.2e}"
    dtypes = "/".join(result.dtypes) or "no floating tensors"
    biases = f", {result.trained_biases} trained biases from the adapter" if result.trained_biases else ""
    source = "the base checkpoint's" if dtype_arg is None else "--dtype"
    return (f"merged {result.scaled_tensors} tensors over {result.shards} shard(s) into {result.out}"
            f"{' (lm_head untied)' if result.untied else ''}{biases}; dtype {dtypes} ({source}); {check}")


if __name__ == "__main__":
    sys.exit(main())
