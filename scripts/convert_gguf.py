"""Convert a GGUF LLaMA checkpoint into a plain transformers directory (safetensors + tokenizer).

Called by scripts/fetch_smollm2.sh; usable on its own:
    python scripts/convert_gguf.py GGUF_FILE OUT_DIR [--check]

transformers dequantises a GGUF to fp32 on load, but ``save_pretrained`` refuses a GGUF-loaded
model, so we rebuild the same architecture without ``quantization_config`` and load the state dict
into it. The output is written to a temporary sibling directory and renamed into place, so an
interrupted conversion never leaves a half-written model that a later run would take as done.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

CHECK_PROMPT = "What is the capital of France?"
CHECK_ANSWER = "The capital of France is Paris."


def convert(gguf_file: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = os.path.split(os.path.abspath(gguf_file))
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gg = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gg.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF state dict; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"convert: state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if tok.chat_template is None:
        raise RuntimeError(f"convert: {gguf_file} carries no chat template")
    tmp = out_dir + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def check(model_dir: str) -> str:
    """Greedy answer to the chat prompt (the known-good answer is CHECK_ANSWER)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf_file")
    ap.add_argument("out_dir")
    ap.add_argument("--check", action="store_true", help="greedy-decode the capital-of-France prompt")
    args = ap.parse_args(argv)
    t0 = time.time()
    convert(args.gguf_file, args.out_dir)
    print(f"convert_gguf: converted in {time.time() - t0:.0f}s -> {args.out_dir}", file=sys.stderr)
    if args.check:
        answer = check(args.out_dir)
        if answer != CHECK_ANSWER:
            print(f"convert_gguf: check failed: {answer!r} != {CHECK_ANSWER!r}", file=sys.stderr)
            return 1
        print(f"convert_gguf: check ok: {answer!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
