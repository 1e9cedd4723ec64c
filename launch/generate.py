"""Generate text with a base model and, optionally, a Propulsion adapter (and its trained biases).

    python launch/generate.py --model assets/stories260K --adapter out/tiny/adapter \
        --prompt "Once upon a time" --max-new-tokens 60 [--sample --temperature 0.8 --top-p 0.9]

Prompts are rendered as the adapter was trained (its config's "prompt" entry, else the run's
config.json beside the adapter directory): ``instruction`` data puts each prompt in the run's
template (default Alpaca) and prepends BOS, as training does; ``chat`` data applies the tokenizer's
chat template with a generation prompt; ``text`` data and adapters without the entry (older
ones) take the prompt as it is. ``--raw`` always takes it as it is. One line on stderr says which.

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
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as it is, without the adapter's training template")
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


def prompt_format(adapter_dir) -> dict | None:
    """How the adapter's training rendered prompts: ``{"format", "template"}``, or None (unknown)."""
    import json

    from propulsion_ds.method.adapter import read_adapter_config

    meta = read_adapter_config(adapter_dir)
    if isinstance(meta.get("prompt"), dict):
        return meta["prompt"]
    run_config = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "config.json")
    try:   # an adapter written before the entry existed: the run's config beside it
        with open(run_config) as f:
            data = json.load(f).get("data", {})
        return {"format": data.get("format", "text"), "template": data.get("template")}
    except (OSError, ValueError, AttributeError):
        return None


def prompt_ids(tok, prompt: str, fmt: dict | None) -> tuple[list, str]:
    """The token ids the model sees for ``prompt`` and a word on how they were made."""
    from propulsion_ds.data.tokens import render_prompt

    kind = (fmt or {}).get("format")
    if kind == "instruction":
        text = render_prompt(prompt, "", fmt.get("template"), where="--prompt")
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return head + tok(text, add_special_tokens=False)["input_ids"], "the run's instruction template"
    if kind == "chat" and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"], "the chat template"
    return tok(prompt)["input_ids"], "the prompt as it is"


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
    fmt = None
    if args.adapter:
        try:
            load_adapter(model, args.adapter)        # z and, with train_bias, the trained biases
            fmt = None if args.raw else prompt_format(args.adapter)
        except AdapterError as e:
            fail(str(e))
    model.to(device)
    print(f"generating on {device} in {str(model.dtype).replace('torch.', '')}"
          f"{' with adapter ' + args.adapter if args.adapter else ''}", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    from propulsion_ds.errors import DataError
    for prompt in args.prompt:
        try:
            ids, how = prompt_ids(tok, prompt, fmt)
        except DataError as e:
            fail(str(e))
        print(f"prompt: {how}", file=sys.stderr, flush=True)
        ids = {"input_ids": torch.tensor([ids], device=device)}
        ids["attention_mask"] = torch.ones_like(ids["input_ids"])
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
