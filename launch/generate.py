"""Generate text with a base model and, optionally, a Propulsion adapter (and its trained biases).

    python launch/generate.py --model assets/stories260K --adapter out/tiny/adapter \
        --prompt "Once upon a time" --max-new-tokens 60 [--sample --temperature 0.8 --top-p 0.9]

Runs on the GPU when one is present (``--device auto``: cuda if available, else cpu) and in the
model's own dtype (``--dtype auto``: the checkpoint's ``dtype`` in config.json, e.g. bf16, on a
CPU too; ``--dtype fp32`` to upcast). Tokens are
streamed to stdout as they are generated (transformers' ``TextStreamer``); one line on stderr
says the device and dtype used. Exit 2 with a one-line error for a bad directory or adapter.
"""
from __future__ import annotations

import argparse
import os
import sys

from launch.common import fail, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", help="adapter directory (propulsion.safetensors + propulsion_config.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="default: the checkpoint's own dtype")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--no-stream", action="store_true", help="print each completion once it is done")
    return p.parse_args(argv)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"--device: not a device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device: cuda requested but no GPU is available")
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if not os.path.isdir(args.model):
        fail(f"--model: directory {args.model} not found")
    if args.adapter and not os.path.isdir(args.adapter):
        fail(f"--adapter: directory {args.adapter} not found")

    import torch
    from transformers import AutoModelForCausalLM, TextStreamer

    from propulsion_ds.errors import AdapterError
    from propulsion_ds.method.adapter import load_adapter
    from propulsion_ds.model import DTYPES, load_tokenizer

    device = pick_device(args.device)
    tok = load_tokenizer(args.model)
    dtype = "auto" if args.dtype == "auto" else DTYPES[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    if args.adapter:
        try:
            load_adapter(model, args.adapter)        # z and, with train_bias, the trained biases
        except AdapterError as e:
            fail(str(e))
    model.to(device)
    print(f"generating on {device} in {str(model.dtype).replace('torch.', '')}"
          f"{' with adapter ' + args.adapter if args.adapter else ''}", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    for prompt in args.prompt:
        ids = tok(prompt, return_tensors="pt").to(device)
        streamer = None if args.no_stream else TextStreamer(tok, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 temperature=args.temperature if args.sample else None,
                                 top_p=args.top_p if args.sample else None,
                                 pad_token_id=tok.pad_token_id, streamer=streamer)
        if streamer is None:
            print(tok.decode(out[0], skip_special_tokens=True), flush=True)
        else:
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
