"""Generate text with a base model and, optionally, a Propulsion adapter.

    python launch/generate.py --model assets/stories260K --adapter out/tiny/adapter \
        --prompt "Once upon a time" --max-new-tokens 60 [--sample --temperature 0.8 --top-p 0.9]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import fail, setup_logging  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", help="adapter directory (propulsion.safetensors + propulsion_config.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = p.parse_args(argv)
    setup_logging()
    if not os.path.isdir(args.model):
        fail(f"--model: directory {args.model} not found")

    import torch
    from transformers import AutoModelForCausalLM

    from propulsion_ds.adapter import AdapterError, load_adapter
    from propulsion_ds.model import DTYPES, load_tokenizer

    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except AdapterError as e:
            fail(str(e))
    torch.manual_seed(args.seed)
    for prompt in args.prompt:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 temperature=args.temperature if args.sample else None,
                                 top_p=args.top_p if args.sample else None,
                                 pad_token_id=tok.pad_token_id)
        print(tok.decode(out[0], skip_special_tokens=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
