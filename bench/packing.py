"""Packed vs unpacked batches: padding share and useful target tokens per second (docs/DESIGN.md "Training arithmetic").

    python bench/packing.py [--seconds 8] [--out-dir bench/results]

Two variable-length data sets through the project's own pipeline (``build_datasets`` +
``epoch_batches`` + ``get_batch``), each trained packed and unpacked with the same model, the same
optimizer and the same tokens per micro-batch:

* self-instruct seed tasks (every instance flattened into an instruction/input/output row),
  Llama-2 tokenizer, a tiny random LLaMA with vocabulary 32000, max_length 512, Alpaca template;
* tinyshakespeare, one document per line, the real stories260K model and tokenizer, max_length 256.

Every micro-batch holds about 4096 padded tokens: packed ones are ``4096 / max_length`` rows
of at most ``max_length`` (padded to the longest row); unpacked ones are padded to their longest
sample, with the row count whose mean padded size is closest to 4096. Short text documents are
also packed into 64-token rows: sdpa/eager compute every score of a row's L x L block-diagonal
mask, so long rows of short documents pay attention work that the varlen kernels
(flash_attention_2) would skip. A step is forward + backward + AdamW on every
weight (the tokens' cost is what padding wastes; the method's trainable set does not change it).
Useful tokens = target tokens (labels that count in the loss).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common  # a sibling: bench/ is sys.path[0] when a bench script runs as a file

SEEDS = Path("/work/shared/data/self_instruct_seed_tasks.jsonl")
LLAMA2 = common.ROOT / "tests" / "fixtures" / "llama2-tokenizer"


def _self_instruct_rows(tmp: Path) -> str:
    src = SEEDS if SEEDS.exists() else common.ROOT.parent / "shared" / "data" / SEEDS.name
    path = tmp / "self_instruct_instances.jsonl"
    with open(src) as f, open(path, "w") as out:
        for line in f:
            task = json.loads(line)
            for inst in task["instances"]:
                out.write(json.dumps({"instruction": task["instruction"], "input": inst["input"],
                                      "output": inst["output"]}) + "\n")
    return str(path)


def _shakespeare_lines(tmp: Path) -> str:
    path = tmp / "shakespeare_lines.jsonl"
    with open(common.SHAKESPEARE) as f, open(path, "w") as out:
        for line in f:
            if line.strip():
                out.write(json.dumps({"text": line.rstrip("\n")}) + "\n")
    return str(path)


def _batches(ds, mbs, pad, n, seed=0):
    from propulsion_ds import data
    plan = data.epoch_batches(ds, mbs, 0, 1, seed=seed, epoch=0)
    return [data.get_batch(ds, idx, pad) for idx in plan[:n]]


def _unpacked_mbs(ds, target_tokens, pad):
    """Rows per unpacked micro-batch whose mean padded size is closest to ``target_tokens``."""
    best = None
    for mbs in range(1, 257):
        bs = _batches(ds, mbs, pad, 20)
        mean = sum(b["input_ids"].numel() for b in bs) / len(bs)
        if best is None or abs(mean - target_tokens) < abs(best[1] - target_tokens):
            best = (mbs, mean)
        if mean > 1.5 * target_tokens:
            break
    return best[0]


def _measure(model, batches, seconds):
    import torch
    from propulsion_ds import data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        out = model(**b, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:  # warm-up
        step(b)
    t0, i, targets, real, cells = time.perf_counter(), 0, 0, 0, 0
    while time.perf_counter() - t0 < seconds:
        b = batches[i % len(batches)]
        step(b)
        targets += int((b["labels"][:, 1:] != -100).sum())
        real += data.real_tokens(b)
        cells += b["input_ids"].numel()
        i += 1
    dt = time.perf_counter() - t0
    return {"steps": i, "seconds": dt, "target_tok_s": targets / dt, "padding_share": 1 - real / cells,
            "tokens_per_batch": cells / i}


def run(seconds: float) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
    from propulsion_ds import data
    from propulsion_ds.config import DataConfig
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama_tok = LlamaTokenizer.from_pretrained(str(LLAMA2))
        stories_tok = common.tokenizer()
        tiny32k = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2)
        cases = [
            ("self-instruct (Llama-2 tok, tiny LLaMA 32k)", _self_instruct_rows(tmp), "instruction", 512, llama_tok,
             lambda: LlamaForCausalLM(LlamaConfig(**tiny32k))),
            ("tinyshakespeare lines (stories260K)", _shakespeare_lines(tmp), "text", 256, stories_tok,
             lambda: AutoModelForCausalLM.from_pretrained(str(common.STORIES), dtype=torch.float32)),
        ]
        target = 8 * 512  # padded tokens per micro-batch, every row of the table
        for name, path, fmt, L, tok, make_model in cases:
            pad = data.pad_token_id(tok)
            unpacked = data.build_datasets(DataConfig(train=path, format=fmt, max_length=L, packing=False), tok).train
            # packed at max_length L, and for short documents also at a shorter row length, where
            # the block-diagonal attention over a row costs less (sdpa/eager compute all L x L scores)
            runs = [(False, L, unpacked, _unpacked_mbs(unpacked, target, pad))]
            for pl in ([L, 64] if fmt == "text" else [L]):
                ds = data.build_datasets(DataConfig(train=path, format=fmt, max_length=pl, packing=True), tok).train
                runs.append((True, pl, ds, target // pl))
            for packing, pl, ds, mbs in runs:
                torch.manual_seed(0)
                model = make_model().train()
                r = _measure(model, _batches(ds, mbs, pad, 64), seconds)
                r.update(data=name, packing=packing, rows_per_batch=mbs, max_length=pl,
                         samples=len(unpacked), rows=len(ds))
                rows.append(r)
    return rows


def table(rows, info) -> str:
    lines = [f"Packing benchmark, {info['date']}, {info['platform']}, {info['cpu_cores']} cores, "
             f"torch {info['torch']}, {common.load_note(info['load_avg_1m'], info['cpu_cores'])}", "",
             "| data | batches | rows x tokens/batch | padding share | useful target tok/s | speed-up |",
             "|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if not r["packing"]:
            base[r["data"]] = r["target_tok_s"]
        kind = f"packed to {r['max_length']} ({r['rows']} rows from {r['samples']} samples)" if r["packing"] else \
            f"unpacked ({r['samples']} samples, max_length {r['max_length']})"
        lines.append(f"| {r['data']} | {kind} | {r['rows_per_batch']} x {r['tokens_per_batch']:.0f} | "
                     f"{100 * r['padding_share']:.1f}% | {r['target_tok_s']:.0f} | "
                     f"{r['target_tok_s'] / base[r['data']]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    ap.add_argument("--out-dir", default=str(common.RESULTS))
    args = ap.parse_args()
    common.quiet()
    load0 = common.load_average()
    rows = run(args.seconds)
    info = common.machine("cpu", 1, "none")
    info["load_avg_1m_start"] = load0
    out = table(rows, info)
    print(out)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "packing.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
