"""Export an adapter: to peft's IA3 format, or (our format) out of a DeepSpeed resume checkpoint.

    python launch/export.py --adapter out/run/adapter --to peft --out out/run/peft
    python launch/export.py --checkpoint out/run/checkpoints/step_200 --out out/run/adapter_step200
    python launch/export.py --checkpoint out/run/checkpoints/step_200 --to peft --out out/run/peft200

--to peft writes adapter_config.json + adapter_model.safetensors that
``PeftModel.from_pretrained(base, DIR)`` loads: ia3_l = z**k per output channel (fp32; the mean of
the powers with several vectors per module), feedforward_modules [] (every target scales its
output). One-way: z and k cannot be recovered from z**k, so resume training from our adapter or
checkpoint, not from the export. Refused (IA3 cannot express them): propulsion.embeddings=true,
propulsion.train_bias=true, and a scaled lm_head tied to the input embedding (peft's merge would
scale the shared weight; launch/merge.py --untie handles it).

--checkpoint writes propulsion.safetensors + propulsion_config.json (what training writes into
out/run/adapter), loadable by launch/generate.py and launch/merge.py; the run's config is read
from two levels above the checkpoint (out/run/config.json) unless --config is given.

Exit codes: 0 written; 2 bad input (not an adapter or checkpoint directory, a missing config.json,
a setting the target format cannot express, a non-empty --out without --overwrite).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from launch.common import fail, one_line_errors, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="a Propulsion adapter directory (propulsion_config.json + propulsion.safetensors)")
    src.add_argument("--checkpoint", help="a DeepSpeed resume checkpoint directory (out/run/checkpoints/step_N)")
    p.add_argument("--to", choices=("peft", "propulsion"), default=None,
                   help="output format: peft (IA3) or propulsion (our own; the default for --checkpoint)")
    p.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    p.add_argument("--base", default=None,
                   help="base model directory (its config.json); default: the one the adapter/run records")
    p.add_argument("--base-name", default=None,
                   help="--to peft: base_model_name_or_path to record (default: --base, else the recorded base)")
    p.add_argument("--config", default=None, help="--checkpoint: the run's config.json (default: two levels up)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (custom architectures)")
    args = p.parse_args(argv)
    if args.adapter is not None and args.to != "peft":
        fail("--adapter needs --to peft (an adapter directory is already in our own format)")
    args.to = args.to or "propulsion"
    if args.config is not None and args.checkpoint is None:
        fail("--config applies only to --checkpoint")
    if args.base_name is not None and args.to != "peft":
        fail("--base-name applies only to --to peft")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from propulsion_ds.tools.export_checkpoint import adapter_from_checkpoint
    from propulsion_ds.tools.export_peft import export_peft

    remote = True if args.trust_remote_code else None
    with one_line_errors(squash=True):
        if args.checkpoint is not None:
            if args.to == "propulsion":
                r = adapter_from_checkpoint(args.checkpoint, args.out, config=args.config, base=args.base,
                                            overwrite=args.overwrite, trust_remote_code=remote)
                print(f"wrote the adapter of {args.checkpoint} (step {r.step}, ZeRO-{r.zero_stage}, "
                      f"{r.world_size} rank(s), {r.trainable} values) to {r.out}")
                return 0
            with tempfile.TemporaryDirectory(prefix="propulsion-export-") as tmp:
                r = adapter_from_checkpoint(args.checkpoint, os.path.join(tmp, "adapter"), config=args.config,
                                            base=args.base, trust_remote_code=remote)
                p = export_peft(r.out, args.out, base=args.base, base_name=args.base_name,
                                overwrite=args.overwrite, trust_remote_code=bool(remote))
        else:
            p = export_peft(args.adapter, args.out, base=args.base, base_name=args.base_name,
                            overwrite=args.overwrite, trust_remote_code=bool(remote))
    print(f"wrote a peft IA3 adapter ({p.modules} modules, ia3_l = z**k, feedforward_modules [], "
          f"fan_in_fan_out {str(p.fan_in_fan_out).lower()}, base {p.base_model_name_or_path!r}) to {p.out}; "
          f"one-way: resume training from the Propulsion adapter, not from this export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
