"""Adaptation quality: the real stories260K adapted to tinyshakespeare, every method on one budget.

    python bench/quality.py                 # default: 200 steps, LR sweep per method, 3 seeds
    python bench/quality.py --quick         # smoke test: a few steps, one LR, one seed
    python bench/quality.py --task gsm8k    # the real SmolLM2-135M-Instruct on GSM8K train problems
                                            # (one seed, one LR per method: see GSM8K_LRS)

GSM8K task (``--task gsm8k``, model SmolLM2-135M-Instruct from scripts/fetch_smollm2.sh): the
first ``--train-rows`` (256) problems of GSM8K's train split are the training data, the next
``--eval-rows`` (64) the held-back eval set, each a user/assistant chat rendered with the model's own
ChatML template and trained on the assistant turn only (``data.format: chat``); eval loss is the
token-weighted mean over the held-back answers. Rows come from ../shared/data/gsm8k_train.jsonl
(or, without it, assets/data/gsm8k_sample.jsonl, whose 300 rows are the same split's first 300).

Plain PyTorch, one process per run (``--jobs`` runs side by side, one thread each); the data are
the project's own pipeline (``propulsion_ds.data.build_datasets``: tinyshakespeare packed to
``--max-length`` tokens, the last 5% of the file's lines held out as the eval set). Every method
gets the same steps, micro-batch, AdamW (no weight decay), warm-up + cosine schedule and gradient
clipping; only the learning rate is tuned per method: a small grid on seed 0, extended by one
step past the edge when the best LR sits on it, picked by final eval loss. The picked LR then
runs on two more seeds (seed = data order, and LoRA's random init); tables report mean ± std.

Methods:
- base: the frozen model, no training.
- propulsion k=1/5/15/55: ``propulsion_ds.inject`` on all decoder linears (y * z**k).
- propulsion All: k=15 plus the input embedding and lm_head (the paper's "All" variant).
- multi-propulsion n=4: k=15, four vectors per module averaged (``num_vectors=4``).
- peft IA3: the same 7 linears, output-scaled (``feedforward_modules=[]``, see common.ia3_config).
- peft LoRA r=8 (alpha 16) on the same 7 linears.
- BitFit: LLaMA's linears have no biases; we add a zero-initialised trainable bias to each of the 7
  decoder linears (the model is unchanged at step 0; same count as propulsion, additive instead
  of multiplicative) and train only those.
- norm gains (opt-in, ``--methods ... norms``): the RMSNorm weights only, the other reading of
  "BitFit" for a bias-free model (a per-channel scale on the normalised input of q/k/v and
  gate/up, and on the final norm).
- full fine-tuning: every parameter.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

if __package__:         # imported as bench.quality (the tests)
    from . import common
else:                   # run as a file: bench/ is sys.path[0]
    import common

# name: (label, LR grid). Grids are centred on what each parameterisation needs: the scale's
# step is ~k x lr for propulsion (k acts as a learning-rate multiplier, docs/DESIGN.md "The method").
METHODS = {
    "base": ("frozen base (no training)", []),
    "prop_k1": ("propulsion-ds k=1", [3e-2, 1e-1, 3e-1]),
    "prop_k5": ("propulsion-ds k=5", [3e-3, 1e-2, 3e-2]),
    "prop_k15": ("propulsion-ds k=15", [1e-3, 3e-3, 1e-2]),
    "prop_k55": ("propulsion-ds k=55", [3e-4, 1e-3, 3e-3]),
    "prop_k35": ("propulsion-ds k=35", [3e-4, 1e-3, 3e-3]),
    "prop_attn": ("propulsion-ds k=15, attention linears only", [1e-3, 3e-3, 1e-2]),
    "prop_mlp": ("propulsion-ds k=15, MLP linears only", [1e-3, 3e-3, 1e-2]),
    "prop_all": ("propulsion-ds All (k=15, + embedding, lm_head)", [1e-3, 3e-3, 1e-2]),
    "prop_n4": ("multi-propulsion n=4 (k=15)", [1e-3, 3e-3, 1e-2]),
    "ia3": ("peft IA3 (7 linears, output-scaled)", [3e-2, 1e-1, 3e-1]),
    "lora": ("peft LoRA r=8", [3e-3, 1e-2, 3e-2]),
    "bitfit": ("BitFit (zero-init biases on the 7 linears)", [3e-2, 1e-1, 3e-1]),
    "norms": ("RMSNorm gains only (opt-in)", [1e-1, 3e-1, 1e0]),
    "full": ("full fine-tuning", [1e-3, 3e-3, 1e-2]),
}
DEFAULT_METHODS = [m for m in METHODS if m not in ("norms", "prop_k35", "prop_attn", "prop_mlp")]
GSM8K_METHODS = ["prop_k15", "prop_all", "ia3", "lora", "full"]
# One LR per method for the 135M run (a sweep does not fit 2 CPU cores): the stories260K sweep's
# picks for the scale methods (k acts as an LR multiplier, so the same per-step change of z**k),
# and the usual small-model fine-tuning rates for LoRA and full fine-tuning.
# A first try at 3e-3 for k=15 (stories260K's pick) raised SmolLM2's eval loss from 1.63 to 2.65
# in 2 steps: a pretrained model's z**15 cannot move 4.5% per step; 5e-4 moves it ~0.75%, and
# IA3 (z**1) at 15x that LR takes the same step.
GSM8K_LRS = {"prop_k15": 5e-4, "prop_all": 5e-4, "ia3": 7.5e-3, "lora": 5e-4, "full": 2e-5}
LR_LADDER = sorted(m * 10.0 ** e for e in range(-7, 2) for m in (1, 3))


def _neighbour(lr: float, up: bool) -> float:
    """The next learning rate on the 1-3-10 ladder above (or below) ``lr``."""
    if up:
        return next((x for x in LR_LADDER if x > lr * 1.01), lr * 3)
    return next((x for x in reversed(LR_LADDER) if x < lr / 1.01), lr / 3)


_DATA = {}
TASK = {"name": "shakespeare", "model": "stories260K", "train_rows": 256, "eval_rows": 64}


# ------------------------------------------------------------------------------------ one run
def gsm8k_rows(n_train: int, n_eval: int):
    """(train, eval) chat rows: GSM8K train problems [0, n_train) and [n_train, n_train + n_eval)."""
    import json as _json
    src = common.GSM8K if common.GSM8K.is_file() else common.GSM8K_SAMPLE
    rows = []
    with open(src) as f:
        for line in f:
            r = _json.loads(line)
            q, a = (r["question"], r["answer"]) if "question" in r else (r["instruction"], r["output"])
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            if len(rows) >= n_train + n_eval:
                break
    if len(rows) < n_train + n_eval:
        raise SystemExit(f"{src}: {len(rows)} rows, need {n_train} train + {n_eval} eval")
    return rows[:n_train], rows[n_train:], str(src)


def _data(max_length: int):
    key = (TASK["name"], max_length)
    if key not in _DATA:
        from propulsion_ds import data
        tok = common.tokenizer(TASK["model"])
        if TASK["name"] == "gsm8k":
            import json as _json
            import tempfile
            from propulsion_ds.config import DataConfig
            train_rows, eval_rows, _ = gsm8k_rows(TASK["train_rows"], TASK["eval_rows"])
            tmp = Path(tempfile.mkdtemp(prefix="gsm8k_"))
            for name, rows in (("train", train_rows), ("eval", eval_rows)):
                (tmp / f"{name}.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
            cfg = DataConfig(train=str(tmp / "train.jsonl"), eval=str(tmp / "eval.jsonl"), format="chat",
                             max_length=max_length, packing=True)
            built = data.build_datasets(cfg, tok)
            train, ev = built.train, built.eval
        else:
            train, ev = common.shakespeare(tok, max_length)
        _DATA[key] = (train, ev, data.pad_token_id(tok))
    return _DATA[key]


def _init_worker(threads: int, task: dict | None = None) -> None:
    import torch
    if task:
        TASK.update(task)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    common.quiet()


def apply_method(model, method: str):
    """Apply ``method`` to a fresh base model in place (peft returns a wrapper); return the model."""
    import torch
    from torch import nn
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("prop_"):
        from propulsion_ds import PropulsionConfig, inject
        cfg = {"prop_k1": dict(degree=1), "prop_k5": dict(degree=5), "prop_k15": dict(degree=15),
               "prop_k55": dict(degree=55), "prop_k35": dict(degree=35),
               "prop_attn": dict(degree=15, targets="attention"),
               "prop_mlp": dict(degree=15, targets=["gate_proj", "up_proj", "down_proj"]), "prop_all": dict(degree=15, embeddings=True, lm_head=True),
               "prop_n4": dict(degree=15, num_vectors=4)}[method]
        inject(model, PropulsionConfig(**cfg))
    elif method in ("ia3", "lora"):
        from peft import get_peft_model
        model = get_peft_model(model, common.ia3_config() if method == "ia3" else common.lora_config(8))
    elif method == "bitfit":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in common.LLAMA_LINEARS:
                assert module.bias is None
                module.bias = nn.Parameter(torch.zeros(module.out_features))
    elif method == "norms":
        for name, p in model.named_parameters():
            if "norm" in name:
                p.requires_grad_(True)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method != "base":
        raise ValueError(f"unknown method {method!r}")
    return model


def evaluate(model, ev, pad, micro_batch: int, max_batches: int | None) -> float:
    import torch
    from propulsion_ds import data
    plan = data.epoch_batches(ev, micro_batch, 0, 1, 0, 0, shuffle=False)
    if max_batches:
        plan = plan[:max_batches]
    model.eval()
    loss_sum = n_sum = 0.0
    with torch.no_grad():
        for idx in plan:
            b = data.get_batch(ev, idx, pad)
            out = model(**b)
            n = float((b["labels"][:, 1:] != -100).sum())
            loss_sum += out.loss.item() * n
            n_sum += n
    model.train()
    return loss_sum / n_sum


def run_one(method: str, lr: float, seed: int, steps: int, micro_batch: int, max_length: int,
            eval_every: int, eval_batches: int | None, warmup: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from propulsion_ds import data
    from propulsion_ds.train.ds_engine import lr_lambda

    train, ev, pad = _data(max_length)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(common.model_path(TASK["model"])), dtype=torch.float32)
    model.config.use_cache = False
    model = apply_method(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    curve = [(0, evaluate(model, ev, pad, micro_batch, eval_batches))] if eval_every <= steps else []
    t0 = time.perf_counter()
    if params and steps:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", warmup, steps))
        per_epoch = data.batches_per_epoch(len(train), micro_batch, 1)
        step = 0
        while step < steps:
            for idx in data.epoch_batches(train, micro_batch, 0, 1, seed, step // per_epoch):
                out = model(**data.get_batch(train, idx, pad))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if not math.isfinite(out.loss.item()):
                    curve.append((step, float("nan")))
                    return dict(method=method, lr=lr, seed=seed, trainable=trainable, curve=curve,
                                eval_loss=float("nan"), s_per_step=(time.perf_counter() - t0) / step)
                if step % eval_every == 0 and step < steps:
                    e0 = time.perf_counter()
                    curve.append((step, evaluate(model, ev, pad, micro_batch, eval_batches)))
                    t0 += time.perf_counter() - e0           # ms/step counts training only
                if step >= steps:
                    break
        train_s = time.perf_counter() - t0
        final = evaluate(model, ev, pad, micro_batch, None)
        curve.append((steps, final if eval_batches is None else evaluate(model, ev, pad, micro_batch, eval_batches)))
    else:
        train_s, final = 0.0, evaluate(model, ev, pad, micro_batch, None)
    return dict(method=method, lr=lr, seed=seed, trainable=trainable, curve=curve, eval_loss=final,
                s_per_step=train_s / steps if steps and params else None)


# ------------------------------------------------------------------------------------ driver
def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="default: all but 'norms' (opt-in); gsm8k: %s; commonsense: %s"
                         % (" ".join(GSM8K_METHODS), " ".join(CS_METHODS)))
    ap.add_argument("--steps", type=int, default=None, help="default 200 (commonsense: 200)")
    ap.add_argument("--micro-batch", dest="micro_batch", type=int, default=8)
    ap.add_argument("--max-length", dest="max_length", type=int, default=None, help="default 128 (commonsense: 256)")
    ap.add_argument("--warmup", type=int, default=None, help="default 10 (commonsense: 12)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="default 3 (gsm8k: 1; commonsense: 3 with --sweep, else 1)")
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=50)
    ap.add_argument("--eval-batches", dest="eval_batches", type=int, default=8,
                    help="eval batches for the intermediate curve points (0: all); step 0 and the "
                         "final eval always use the whole eval set")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    ap.add_argument("--no-extend", action="store_true", help="do not extend a grid whose best LR is on its edge")
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps, middle LR, one seed, small eval")
    ap.add_argument("--task", default="shakespeare", choices=["shakespeare", "gsm8k", "commonsense"],
                    help="shakespeare: stories260K on tinyshakespeare; gsm8k: SmolLM2-135M on GSM8K chats; "
                         "commonsense: SmolLM2-135M on the BoolQ/ARC/OBQA mix, dev multiple-choice accuracy")
    ap.add_argument("--train-rows", dest="train_rows", type=int, default=None,
                    help="default 256 (commonsense: 3200, a quarter from each train file)")
    ap.add_argument("--eval-rows", dest="eval_rows", type=int, default=64)
    ap.add_argument("--lr", dest="lrs", action="append", default=[], metavar="METHOD=LR",
                    help="use this one LR for METHOD (no sweep); repeatable")
    ap.add_argument("--out-dir", default=str(common.RESULTS))
    cs = ap.add_argument_group("commonsense task")
    cs.add_argument("--data-dir", dest="data_dir", default=CS_DATA_DIR,
                    help="directory of {boolq,arc_easy,arc_challenge,openbookqa}_{train,dev}.jsonl")
    cs.add_argument("--eval-files", dest="eval_files", nargs="+", default=None,
                    help="score these files (same format) instead of the four dev files")
    cs.add_argument("--sweep", action="store_true",
                    help="run each method's LR grid on seed 0 first, pick by dev mean accuracy")
    cs.add_argument("--json", default=None, help="write the result here (default: <out-dir>/commonsense_<format>.json)")
    cs.add_argument("--answer-format", dest="answer_format", choices=["label", "text"], default=None,
                    help=f"completion scored per option (default {CS_DEFAULT_FORMAT!r}, see docs/QUALITY.md)")
    cs.add_argument("--eval-questions", dest="eval_questions", type=int, default=None,
                    help="score only the first N questions of each eval file (default: all)")
    cs.add_argument("--bf16", choices=["auto", "on", "off"], default="on",
                    help="bf16 autocast (fp32 master weights) for training (scoring is fp32); default on: 2.3x "
                         "faster fwd+bwd on this project's 2-core AMX machine (docs/QUALITY.md); auto: "
                         "time one fwd+bwd both ways first and use bf16 if 1.2x faster (only on an idle "
                         "machine: under contention the timing says nothing)")
    cs.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    cs.add_argument("--first-seed", dest="first_seed", type=int, default=0,
                    help="seeds first_seed .. first_seed + seeds - 1 (more seeds for a finished table: "
                         "merge the files with --report)")
    cs.add_argument("--eval-at", dest="eval_at", type=int, nargs="+", default=(),
                    help="also score the eval questions after these steps (a learning curve within the "
                         "one schedule; each run's 'curve' in the JSON)")
    cs.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="print the table of finished result files (and redraw their plots; with several, "
                         "also one merged table, plotted to --json's path with .png if given); runs nothing")
    args = ap.parse_args(argv)
    fixed = {}
    for item in args.lrs:
        m, _, v = item.partition("=")
        if m not in METHODS or not v:
            ap.error(f"--lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(METHODS)}")
        fixed[m] = float(v)
    if args.task == "commonsense" and args.report:
        return commonsense_report(args.report, args.json)
    if args.task == "commonsense":
        # ~1.1 epochs of the mix: where the trained methods clear the base by more than the noise
        # (docs/QUALITY.md; 60 steps of 1,200 rows did not)
        args.steps = 200 if args.steps is None else args.steps
        args.max_length = 256 if args.max_length is None else args.max_length
        args.warmup = 12 if args.warmup is None else args.warmup
        args.train_rows = 3200 if args.train_rows is None else args.train_rows
        return commonsense_main(args, fixed)
    args.steps = 200 if args.steps is None else args.steps
    args.max_length = 128 if args.max_length is None else args.max_length
    args.warmup = 10 if args.warmup is None else args.warmup
    args.train_rows = 256 if args.train_rows is None else args.train_rows
    args.seeds = 3 if args.seeds is None else args.seeds
    if args.task == "gsm8k":
        TASK.update(name="gsm8k", model="smollm2", train_rows=args.train_rows, eval_rows=args.eval_rows)
        if args.methods is None:
            args.methods = list(GSM8K_METHODS)
        fixed = {**{m: GSM8K_LRS[m] for m in args.methods if m in GSM8K_LRS}, **fixed}
        args.seeds, args.no_extend = 1, True
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS)
    if args.quick:
        args.steps = min(args.steps, 6)
        args.seeds, args.eval_every, args.eval_batches, args.warmup = 1, 3, 2, 1
        args.no_extend = True
    if "base" not in args.methods:
        args.methods = ["base"] + args.methods
    common.quiet()
    _data(args.max_length)                         # tokenize once here; workers hit the datasets cache

    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_init_worker,
                                  initargs=(1, dict(TASK)))
    run_kw = dict(steps=args.steps, micro_batch=args.micro_batch, max_length=args.max_length,
                  eval_every=args.eval_every, eval_batches=args.eval_batches or None, warmup=args.warmup)
    t_start = time.time()
    runs: dict = {m: [] for m in args.methods}

    def submit(method, lr, seed):
        return pool.submit(run_one, method, lr, seed, **run_kw)

    def collect(futures):
        for f in cf.as_completed(futures):
            r = f.result()
            runs[r["method"]].append(r)
            print(f"  {r['method']:9s} lr={r['lr']:.0e} seed={r['seed']} eval={r['eval_loss']:.4f}", flush=True)

    # 1) LR sweep on seed 0 (base: one evaluation).
    grids = {m: ([fixed[m]] if m in fixed else METHODS[m][1][1:2] if args.quick else list(METHODS[m][1]))
             if METHODS[m][1] else [] for m in args.methods}
    collect([submit("base", 0.0, 0)] + [submit(m, lr, 0) for m in args.methods for lr in grids[m]])
    # 2) one step past the edge where the best LR sits on it.
    if not args.no_extend:
        extra = []
        for m in args.methods:
            if not grids[m]:
                continue
            best = min(runs[m], key=lambda r: _nan_last(r["eval_loss"]))["lr"]
            g = sorted(grids[m])
            if best == g[-1]:
                extra.append((m, _neighbour(g[-1], up=True)))
            elif best == g[0]:
                extra.append((m, _neighbour(g[0], up=False)))
        for m, lr in extra:
            grids[m].append(lr)
        collect([submit(m, lr, 0) for m, lr in extra])
    best_lr = {m: (min(runs[m], key=lambda r: _nan_last(r["eval_loss"]))["lr"] if grids[m] else 0.0)
               for m in args.methods}
    # 3) the picked LR on the other seeds.
    collect([submit(m, best_lr[m], s) for m in args.methods if grids[m] for s in range(1, args.seeds)])
    pool.shutdown()

    result = summarize(args, runs, grids, best_lr, time.time() - t_start)
    suffix = ("_gsm8k_smollm2" if TASK["name"] == "gsm8k" else "") + ("_quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"quality{suffix}.json", result)
    plot(result, out_dir / f"quality_curves{suffix}.png")
    print()
    print(header(result))
    print()
    print(table(result))
    return 0


def _nan_last(x):
    return x if math.isfinite(x) else float("inf")


def summarize(args, runs, grids, best_lr, wall_s) -> dict:
    base_loss = runs["base"][0]["eval_loss"]
    picked = {m: sorted([r for r in runs[m] if r["lr"] == best_lr[m]], key=lambda r: r["seed"])
              for m in args.methods}
    full_by_seed = {r["seed"]: r["eval_loss"] for r in picked.get("full", [])}
    methods = {}
    for m in args.methods:
        rs = picked[m] if m != "base" else runs["base"]
        losses = [r["eval_loss"] for r in rs]
        shares = []
        for r in rs:
            full = full_by_seed.get(r["seed"])
            if full is not None and base_loss - full > 0:
                shares.append((base_loss - r["eval_loss"]) / (base_loss - full))
        mean, std = _mean_std(losses)
        smean, sstd = _mean_std(shares)
        sweep = {f"{r['lr']:.0e}": r["eval_loss"] for r in sorted(runs[m], key=lambda r: r["lr"]) if r["seed"] == 0}
        steps_curve = sorted({s for r in rs for s, _ in r["curve"]})
        curve = []
        for s in steps_curve:
            vals = [v for r in rs for st, v in r["curve"] if st == s]
            curve.append([s, *_mean_std(vals)])
        g = sorted(grids.get(m, []))
        methods[m] = dict(label=METHODS[m][0], trainable=rs[0]["trainable"], best_lr=best_lr[m] or None,
                          lr_on_grid_edge=bool(g) and len(g) > 1 and best_lr[m] in (g[0], g[-1]),
                          eval_loss_mean=mean, eval_loss_std=std, eval_losses=losses,
                          seeds=[r["seed"] for r in rs], recovered_mean=smean, recovered_std=sstd,
                          recovered=shares, sweep_seed0=sweep, curve=curve,
                          s_per_step=_mean_std([r["s_per_step"] for r in rs])[0] if m != "base" else None)
    return dict(settings=dict(steps=args.steps, micro_batch=args.micro_batch, max_length=args.max_length,
                              warmup=args.warmup, schedule="cosine", optimizer="AdamW(wd=0), clip 1.0",
                              seeds=args.seeds, eval_every=args.eval_every, quick=args.quick,
                              curve_eval_batches=args.eval_batches or None, task=TASK["name"], model=TASK["model"],
                              eval=("GSM8K train problems [%d, %d) held back (chat, assistant tokens), "
                                    "token-weighted mean loss; trained on [0, %d)"
                                    % (TASK["train_rows"], TASK["train_rows"] + TASK["eval_rows"], TASK["train_rows"])
                                    if TASK["name"] == "gsm8k" else
                                    "last 5% of tinyshakespeare's lines, packed, token-weighted mean loss")),
                machine=common.machine("cpu", 1, "none") | {"jobs": args.jobs, "threads_per_job": 1},
                wall_s=wall_s, base_eval_loss=base_loss, methods=methods)


def header(result) -> str:
    s, m = result["settings"], result["machine"]
    what = ("SmolLM2-135M-Instruct -> GSM8K chats" if s.get("task") == "gsm8k"
            else "stories260K -> tinyshakespeare")
    return (f"### {what}: {s['steps']} steps x micro-batch {s['micro_batch']} x "
            f"{s['max_length']} tokens, {s['seeds']} seed(s); CPU, {m['jobs']} runs side by side, "
            f"1 thread each; {m['date']}, {common.load_note(m['load_avg_1m'], m['cpu_cores'])}, "
            f"{result['wall_s'] / 60:.1f} min")


def table(result) -> str:
    rows = []
    for name, r in result["methods"].items():
        lr = "–" if r["best_lr"] is None else f"{r['best_lr']:.0e}" + (" (edge)" if r["lr_on_grid_edge"] else "")
        rec = "–" if not r["recovered"] else f"{100 * r['recovered_mean']:.1f} ± {100 * r['recovered_std']:.1f} %"
        sps = "–" if not r["s_per_step"] else f"{1e3 * r['s_per_step']:.0f}"
        sweep = ", ".join(f"{k}: {v:.3f}" for k, v in r["sweep_seed0"].items()) if name != "base" else "–"
        rows.append([r["label"], common.fmt_int(r["trainable"]), lr,
                     f"{r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f}", rec, sps, sweep])
    return common.markdown_table(["method", "trainable", "LR (picked)", "eval loss (mean ± std)",
                                  "share of full-FT gain", "ms/step", "LR sweep, seed 0 (eval loss)"], rows)


def plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, r) in enumerate(result["methods"].items()):
        if name == "base":
            ax.axhline(r["eval_loss_mean"], color="k", ls=":", lw=1, label=r["label"])
            continue
        xs = [c[0] for c in r["curve"]]
        ys = [c[1] for c in r["curve"]]
        sd = [c[2] for c in r["curve"]]
        ls = "-" if name.startswith("prop") else "--"
        ax.plot(xs, ys, ls, color=cmap(i), label=f"{r['label']} (lr {r['best_lr']:.0e})", lw=1.3)
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                        color=cmap(i), alpha=0.15)
    ax.set_xlabel("step")
    sub = result["settings"].get("curve_eval_batches")
    ax.set_ylabel("eval loss (held-out tinyshakespeare" + (f", first {sub} batches)" if sub else ")"))
    s = result["settings"]
    what = "SmolLM2-135M-Instruct -> GSM8K" if s.get("task") == "gsm8k" else "stories260K -> tinyshakespeare"
    ax.set_title(f"{what}, mean ± std over {s['seeds']} seed(s)", fontsize=10)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ====================================================================== commonsense (multiple choice)
# SmolLM2-135M-Instruct trained on a mix of the four commonsense train files (BoolQ, ARC-Easy,
# ARC-Challenge, OpenBookQA in the LLM-Adapters instruction format), scored by multiple-choice
# accuracy on their dev files with propulsion_ds.eval.choice (the trainer's own scorer). See
# docs/QUALITY.md for the measurements behind every default below.
CS_FILES = ["boolq", "arc_easy", "arc_challenge", "openbookqa"]
CS_METHODS = ["base", "prop_k15", "prop_all", "ia3", "lora", "full"]
# opt-in (--methods ...), for the evidence on the degree and the targets (docs/QUALITY.md)
CS_EXTRA = ["prop_k5", "prop_k35", "prop_attn", "prop_mlp"]
CS_DATA_DIR = "../shared/data/commonsense"
CS_SAMPLE = common.ROOT / "assets" / "data" / "commonsense_sample"
# The learning rate each method trains at without --sweep (docs/QUALITY.md: how each was chosen on
# dev). The scale methods are matched by their per-step change: z**k moves ~k*lr per step, so
# IA3 (k=1) needs ~15x propulsion k=15's rate for the same step.
CHOSEN_LRS = {"prop_k15": 1e-3, "prop_all": 1e-3, "ia3": 1.5e-2, "lora": 1e-3, "full": 3e-5,
              "prop_k5": 3e-3, "prop_k35": 4.3e-4, "prop_attn": 1e-3, "prop_mlp": 1e-3}
# --sweep grids (seed 0, picked by dev mean accuracy), centred on CHOSEN_LRS' reasoning above.
CS_GRIDS = {"prop_k15": [5e-4, 1e-3, 2e-3, 4e-3], "prop_all": [5e-4, 1e-3, 2e-3],
            "ia3": [7.5e-3, 1.5e-2, 3e-2, 6e-2], "lora": [5e-4, 1e-3, 2e-3, 4e-3],
            "full": [1e-5, 3e-5, 1e-4], "prop_k5": [1.5e-3, 3e-3, 6e-3], "prop_k35": [2e-4, 4.3e-4, 8.6e-4],
            "prop_attn": [5e-4, 1e-3, 2e-3], "prop_mlp": [5e-4, 1e-3, 2e-3]}
# 'text' discriminates for a 135M model, 'label' does not (docs/QUALITY.md, answer-format table).
CS_DEFAULT_FORMAT = "text"


# How a result was scored; files scored otherwise are not merged into one table (--report).
CS_SCORING = "fp32, each question's prompt once for all its candidates"
CS_SCORING_BEFORE = "bf16 autocast, each candidate a separate sequence"   # results before 2026-12-06 16:30
# settings that must agree for two result files to share a table (seeds and LR may differ)
CS_PROTOCOL = ("model", "train_rows", "steps", "micro_batch", "max_length", "warmup", "answer_format",
               "bf16", "scoring")


def _protocol(result: dict) -> dict:
    s = result.get("settings", {})
    return {k: s.get(k, CS_SCORING_BEFORE if k == "scoring" else None) for k in CS_PROTOCOL}


def _die(msg: str):
    """Bad input: one line naming the file or option, exit code 2."""
    print(f"quality.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def cs_data_dir(arg: str, quick: bool) -> Path:
    """--data-dir as given (relative to the working directory, else to the repository root); in
    --quick mode, without it, the small sample shipped in assets/data/commonsense_sample."""
    for p in (Path(arg), common.ROOT / arg):
        if p.is_dir():
            return p
    if quick and CS_SAMPLE.is_dir():
        return CS_SAMPLE
    _die(f"--data-dir: {arg} is not a directory (expected {'/'.join(CS_FILES)}_{{train,dev}}.jsonl)")


def _read_jsonl(path: Path) -> list:
    import json as _json
    if not path.is_file():
        _die(f"{path}: no such file")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(_json.loads(line))
                except ValueError as e:
                    _die(f"{path}: line {i} is not JSON ({e})")
    return rows


def cs_train_mix(data_dir: Path, n_rows: int, seed: int = 0) -> list:
    """``n_rows`` training rows, an equal share from each of the four train files, drawn without
    replacement with a fixed seed and shuffled together: the same rows for every method and seed."""
    import random
    rng = random.Random(seed)
    mix = []
    per = [n_rows // len(CS_FILES) + (i < n_rows % len(CS_FILES)) for i in range(len(CS_FILES))]
    for name, k in zip(CS_FILES, per):
        rows = _read_jsonl(data_dir / f"{name}_train.jsonl")
        mix += rng.sample(rows, min(k, len(rows)))
    rng.shuffle(mix)
    return mix


def cs_questions(files: list, answer_format: str, limit: int | None) -> list:
    """The eval questions of each file (its first ``limit`` rows), tagged with the file's stem."""
    from propulsion_ds.eval import choice
    qs = []
    for f in files:
        rows = _read_jsonl(Path(f))[:limit] if limit else _read_jsonl(Path(f))
        qs += choice.build_questions(rows, None, answer_format, Path(f).stem)
    # Similar lengths in one batch pad less (the scorer pads a batch's candidates to the longest);
    # the counts per file do not depend on the order.
    return sorted(qs, key=lambda q: len(q.prompt) + max(len(c) for c in q.completions))


def cs_train_data(mix: list, answer_format: str, max_length: int, model: str):
    """The mix through the project's instruction pipeline (Alpaca template, packed rows; in the
    text format each row's output names its gold option's text, as eval.answer_format "text" trains)."""
    import json as _json
    import tempfile
    from propulsion_ds import data
    from propulsion_ds.config import DataConfig
    tmp = Path(tempfile.mkdtemp(prefix="commonsense_"))
    keep = ("instruction", "input", "output", "answer")
    (tmp / "train.jsonl").write_text("".join(_json.dumps({k: r.get(k, "") for k in keep}) + "\n" for r in mix))
    tok = common.tokenizer(model)
    cfg = DataConfig(train=str(tmp / "train.jsonl"), format="instruction", max_length=max_length, packing=True,
                     cache_dir=str(tmp / "cache"))
    # the trainer's own rewrite: answer_format "text" trains each row to name its gold option's text
    built = data.build_datasets(cfg, tok, answer_format=answer_format)
    return built.train, data.pad_token_id(tok), tok


def _autocast(bf16: bool):
    import contextlib
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def target_loss(model, batch: dict):
    """``model(**batch).loss`` (mean next-token cross-entropy over the targets), with the lm_head
    applied only at target positions: the prompt's logits (49k-wide on SmolLM2) are never made.
    Works on a transformers causal LM and on a peft wrapper of one (its layers are injected)."""
    import torch
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]
    targets = labels != -100
    logits = lm.get_output_embeddings()(hidden[targets])
    return torch.nn.functional.cross_entropy(logits.float(), labels[targets])


def merged_for_scoring(model, method: str):
    """The trained model with its adapter folded into the weights (Propulsion's and peft's
    ``merge_and_unload``): the same function, scored in fp32 at the frozen base's speed. Unmerged,
    the adapters' own kernels made scoring 5% (Propulsion), 19% (IA3) and 31% (LoRA) slower than
    the base's (docs/QUALITY.md "Budgets"). Only for the last scoring: training cannot go on."""
    if method.startswith("prop_"):
        from propulsion_ds import merge_and_unload
        return merge_and_unload(model, untie=True)     # "All" scales the tied embedding and lm_head apart
    if method in ("ia3", "lora"):
        return model.merge_and_unload()
    return model


def cs_measure_bf16(model_name: str, train, pad, micro_batch: int) -> dict:
    """Seconds for one fwd+bwd of the first training batch in fp32 and under bf16 autocast (after
    one warm-up each), on the frozen model with every parameter trainable (the worst case)."""
    import torch
    from transformers import AutoModelForCausalLM
    from propulsion_ds import data
    model = AutoModelForCausalLM.from_pretrained(str(common.model_path(model_name)), dtype=torch.float32)
    model.config.use_cache = False
    batch = data.get_batch(train, list(range(min(micro_batch, len(train)))), pad)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            with _autocast(bf16):
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        out[name + "_s"] = times[-1]
    out["speedup"] = out["fp32_s"] / out["bf16_s"]
    return out


def cs_run(method: str, lr: float, seed: int, *, model_name: str, train, pad, tok, questions, steps: int,
           micro_batch: int, warmup: int, bf16: bool, answer_format: str, verbose: bool = False,
           eval_at: tuple = ()) -> dict:
    """Train ``method`` for ``steps`` AdamW updates (warm-up + cosine), then score ``questions``;
    also after each step in ``eval_at`` (a learning curve inside the one schedule: the rate has
    not decayed to 0 there, so a point is not what a run of that many steps would give)."""
    import torch
    from transformers import AutoModelForCausalLM
    from propulsion_ds import data
    from propulsion_ds.eval import choice
    from propulsion_ds.train.ds_engine import lr_lambda

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(common.model_path(model_name)), dtype=torch.float32)
    model.config.use_cache = False
    model = apply_method(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    losses, curve = [], []

    def score():
        # fp32 whatever the training precision: two bf16 kernel paths (a prompt run once or once
        # per candidate) pick differently on ~5% of questions, fp32 ones on none (docs/QUALITY.md)
        model.eval()
        with torch.no_grad():
            res = choice.score_questions(model, tok, questions, answer_format=answer_format, progress=verbose)
        model.train()
        return res

    t0 = time.perf_counter()
    if params and steps and method != "base":
        model.train()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", warmup, steps))
        per_epoch = data.batches_per_epoch(len(train), micro_batch, 1)
        step = 0
        while step < steps:
            for idx in data.epoch_batches(train, micro_batch, 0, 1, seed, step // per_epoch):
                with _autocast(bf16):
                    loss = target_loss(model, data.get_batch(train, idx, pad))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step in eval_at and step < steps and math.isfinite(losses[-1]):
                    res = score()
                    per = {k: float(getattr(v, "accuracy", v)) for k, v in res.per_source.items()}
                    curve.append(dict(step=step, accuracy=per, mean_accuracy=statistics.fmean(per.values())))
                    if verbose:
                        print(f"    {method} step {step}: dev mean {100 * curve[-1]['mean_accuracy']:.2f}% "
                              + ", ".join(f"{k} {100 * v:.1f}" for k, v in per.items()), flush=True)
                if verbose and step % 10 == 0:
                    print(f"    {method} step {step}/{steps} loss {statistics.fmean(losses[-10:]):.4f} "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                if not math.isfinite(losses[-1]) or step >= steps:
                    break
            if not math.isfinite(losses[-1]):
                break
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    correct = None
    if losses and not math.isfinite(losses[-1]):
        acc, per = float("nan"), {}
    else:
        model = merged_for_scoring(model, method)
        res = score()
        acc, per = res.accuracy, dict(res.per_source)
        # per eval file, one character per question in `questions` order: the paired comparison's
        # input (--report)
        correct = {}
        for i, q in enumerate(questions):
            correct[q.source] = correct.get(q.source, "") + ("1" if res.picks.get(i) == q.answer else "0")
    eval_s = time.perf_counter() - t1
    n_by = {}
    for q in questions:
        n_by[q.source] = n_by.get(q.source, 0) + 1
    per = {k: float(getattr(v, "accuracy", v)) for k, v in per.items()}
    return dict(method=method, lr=lr, seed=seed, trainable=trainable, accuracy=per,
                mean_accuracy=statistics.fmean(per.values()) if per else float("nan"),
                pooled_accuracy=float(acc), questions=n_by, train_loss_first=losses[0] if losses else None,
                train_loss_last=statistics.fmean(losses[-5:]) if losses else None, steps=len(losses),
                train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t_start, curve=curve,
                load_avg=common._loads(), correct=correct, questions_id=cs_questions_id(questions))


def cs_questions_id(questions) -> str:
    """A short hash of the scored questions in order: two runs' ``correct`` strings pair up only
    when it matches."""
    import hashlib
    h = hashlib.sha256()
    for q in questions:
        h.update(f"{q.source}\0{q.prompt}\0{q.answer}\n".encode())
    return h.hexdigest()[:16]


def _file_order(stems) -> list:
    """File stems in the order of CS_FILES (boolq_dev before arc_easy_dev ...), others after."""
    def key(f):
        hits = [i for i, n in enumerate(CS_FILES) if f == n or f.startswith(n + "_")]
        return (hits[0] if hits else len(CS_FILES), f)
    return sorted(set(stems), key=key)


def _cs_key(r) -> float:
    x = r["mean_accuracy"]
    return x if math.isfinite(x) else -1.0


def cs_pick(runs: list) -> float:
    """The LR of the first seed's run with the best dev mean accuracy (a diverged run, NaN, ranks
    last; a tie goes to the lowest LR)."""
    first = min(r["seed"] for r in runs)
    seed0 = sorted([r for r in runs if r["seed"] == first], key=lambda r: r["lr"])
    return max(seed0, key=_cs_key)["lr"]


def cs_summarize(methods: list, runs: dict, picked_lr: dict, grids: dict) -> dict:
    out = {}
    for m in methods:
        rs = sorted([r for r in runs[m] if r["lr"] == picked_lr[m]], key=lambda r: r["seed"])
        files = _file_order(f for r in rs for f in r["accuracy"])
        acc = {f: statistics.fmean([r["accuracy"][f] for r in rs if f in r["accuracy"]]) for f in files}
        means = [r["mean_accuracy"] for r in rs]
        mean, std = _mean_std(means)
        g = sorted(grids.get(m, []))
        out[m] = dict(label=METHODS[m][0], trainable=rs[0]["trainable"], lr=picked_lr[m], accuracy=acc,
                      mean_accuracy=mean, std=std, seeds=[r["seed"] for r in rs], per_seed_mean=means,
                      pooled_accuracy=_mean_std([r["pooled_accuracy"] for r in rs])[0],
                      lr_on_grid_edge=len(g) > 1 and picked_lr[m] in (g[0], g[-1]),
                      sweep_seed0={f"{r['lr']:g}": r["mean_accuracy"] for r in sorted(runs[m], key=lambda r: r["lr"])
                                   if r["seed"] == 0} if len(g) > 1 else {},
                      train_s=_mean_std([r["train_s"] for r in rs])[0], eval_s=_mean_std([r["eval_s"] for r in rs])[0],
                      train_loss_last=rs[0]["train_loss_last"], load_avg=[r["load_avg"] for r in rs],
                      curves={str(r["seed"]): r["curve"] for r in rs if r.get("curve")},
                      per_seed_accuracy={str(r["seed"]): r["accuracy"] for r in rs},
                      per_seed_correct={str(r["seed"]): [r["questions_id"], r["correct"]] for r in rs
                                        if r.get("correct")})
    return out


def cs_table(result) -> str:
    files = _file_order(f for r in result["methods"].values() for f in r["accuracy"])
    rows = []
    for name, r in result["methods"].items():
        lr = "–" if name == "base" else f"{r['lr']:g}" + (" (edge)" if r.get("lr_on_grid_edge") else "")
        cells = [f"{100 * r['accuracy'][f]:.1f}" if f in r["accuracy"] else "–" for f in files]
        pm = f"{100 * r['mean_accuracy']:.1f}" + (f" ± {100 * r['std']:.1f}" if len(r["seeds"]) > 1 else "")
        rows.append([r["label"], common.fmt_int(r["trainable"]), lr, *cells, pm, len(r["seeds"]),
                     f"{r['train_s'] / 60:.1f} / {r['eval_s'] / 60:.1f}"])
    return common.markdown_table(["method", "trainable", "LR", *files, "mean (± std over seeds)", "seeds",
                                  "train / eval min"], rows)


def cs_curves(result) -> str:
    """The mid-schedule points (--eval-at) of each method's runs beside the final one, as a table."""
    rows = []
    for name, r in result["methods"].items():
        for seed, points in sorted(r.get("curves", {}).items()):
            ends = [dict(step=f"{result['settings']['steps']} (end)", accuracy=r["accuracy"],
                         mean_accuracy=r["mean_accuracy"])] if points and len(r["seeds"]) == 1 else []
            for pt in points + ends:
                cells = [f"{100 * pt['accuracy'][f]:.1f}" for f in _file_order(pt["accuracy"])]
                rows.append([r["label"], seed, pt["step"], *cells, f"{100 * pt['mean_accuracy']:.1f}"])
    if not rows:
        return ""
    files = _file_order(f for r in result["methods"].values() for f in r["accuracy"])
    return common.markdown_table(["method", "seed", "step", *files, "mean"], rows)


def cs_plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = result["methods"]
    files = _file_order(f for r in ms.values() for f in r["accuracy"]) + ["mean"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.8 / max(1, len(ms))
    for i, (name, r) in enumerate(ms.items()):
        ys = [100 * r["accuracy"].get(f, float("nan")) for f in files[:-1]] + [100 * r["mean_accuracy"]]
        err = [0.0] * (len(files) - 1) + [100 * r["std"]]
        ax.bar([j + i * w for j in range(len(files))], ys, w, yerr=err, capsize=2,
               label=f"{r['label']} ({common.fmt_int(r['trainable'])})")
    ax.set_xticks([j + w * (len(ms) - 1) / 2 for j in range(len(files))], files)
    ax.set_ylabel("dev accuracy (%)")
    s = result["settings"]
    ax.set_title(f"{s['model']} on the commonsense mix: {s['steps']} steps x {s['micro_batch']} x "
                 f"{s['max_length']} tokens, answer format '{s['answer_format']}'", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cs_header(result) -> str:
    s, m = result["settings"], result["machine"]
    sub = f", first {s['eval_questions_per_file']} questions a file" if s.get("eval_questions_per_file") else ""
    return (f"### {s['model']}, commonsense mix ({s['train_rows']} rows): {s['steps']} steps x {s['micro_batch']} x "
            f"{s['max_length']} tokens, {s['seeds']} seed(s), format {s['answer_format']!r}"
            f"{', bf16 autocast' if s.get('bf16') else ''}{sub}; {m['date']} UTC, "
            f"{common.load_note(m['load_avg_1m'], m['cpu_cores'])} (at the end), {result['wall_s'] / 60:.1f} min")


def _per_seed(v) -> dict:
    if "per_seed_accuracy" in v:
        return v["per_seed_accuracy"]
    return {str(v["seeds"][0]): v["accuracy"]} if len(v["seeds"]) == 1 else {}


def _merge_seeds(a: dict, b: dict) -> dict:
    """One method's results from two files: the seeds of both, when they trained at the same LR
    (a different LR, or an unknown split by seed, keeps the first file's)."""
    pa, pb = _per_seed(a), _per_seed(b)
    if a["lr"] != b["lr"] or not pa or not pb or set(pa) & set(pb):
        return a
    per = {**pa, **pb}
    files = _file_order(f for acc in per.values() for f in acc)
    means = [statistics.fmean(per[k].values()) for k in sorted(per, key=int)]
    mean, std = _mean_std(means)
    return dict(a, accuracy={f: statistics.fmean(acc[f] for acc in per.values() if f in acc) for f in files},
                mean_accuracy=mean, std=std, seeds=sorted(int(k) for k in per), per_seed_mean=means,
                per_seed_accuracy=per, curves={**a.get("curves", {}), **b.get("curves", {})},
                per_seed_correct={**a.get("per_seed_correct", {}), **b.get("per_seed_correct", {})},
                # weighted by seeds: a merged side already averages its seeds
                train_s=(a["train_s"] * len(pa) + b["train_s"] * len(pb)) / len(per),
                eval_s=(a["eval_s"] * len(pa) + b["eval_s"] * len(pb)) / len(per),
                load_avg=a.get("load_avg", []) + b.get("load_avg", []))


def _paired_bits(a: dict, b: dict, base_b: bool) -> list:
    """(seed, a's per-file strings, b's) for the seeds both ran on the same questions; the frozen
    base is one deterministic run, paired with every seed of the other method."""
    pa, pb = a.get("per_seed_correct", {}), b.get("per_seed_correct", {})
    if base_b and len(pb) == 1:
        only = next(iter(pb.values()))
        pb = {s: only for s in pa}
    return [(s, pa[s][1], pb[s][1]) for s in sorted(set(pa) & set(pb), key=int) if pa[s][0] == pb[s][0]]


def cs_paired(result, ref: str = "prop_k15", reps: int = 4000) -> str:
    """``ref`` against every other method on the same dev questions: the macro-mean difference
    (ref - other) averaged over the seeds both ran, with a 95% interval from a paired bootstrap over
    questions (each file resampled on its own, the same draw for both methods and every seed), and
    the questions only one of the two got right (summed over those seeds)."""
    import numpy as np
    ms = result["methods"]
    if ref not in ms or not ms[ref].get("per_seed_correct"):
        return ""
    rng = np.random.default_rng(0)
    rows = []
    for name, other in ms.items():
        if name == ref:
            continue
        pairs = _paired_bits(ms[ref], other, name == "base")
        if not pairs:
            continue
        files = sorted(pairs[0][1])
        diff, boot, only_ref, only_other = 0.0, np.zeros(reps), 0, 0
        for f in files:
            a = np.array([[c == "1" for c in p[1][f]] for p in pairs], dtype=float)   # seeds x questions
            b = np.array([[c == "1" for c in p[2][f]] for p in pairs], dtype=float)
            d = (a - b).mean(axis=0)                       # per question, averaged over seeds
            diff += d.mean() / len(files)
            idx = rng.integers(0, d.size, size=(reps, d.size))
            boot += d[idx].mean(axis=1) / len(files)
            only_ref += int(((a == 1) & (b == 0)).sum())
            only_other += int(((a == 0) & (b == 1)).sum())
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append([f"{ms[ref]['label']} - {other['label']}", ", ".join(p[0] for p in pairs),
                     f"{100 * diff:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{only_ref} / {only_other}"])
    if not rows:
        return ""
    return common.markdown_table(["paired on the same questions", "seeds", "macro diff (points)",
                                  "95% bootstrap interval", "only first right / only second right"], rows)


def cs_merge(results: list, names: list) -> tuple[dict, list]:
    """One table of every method of ``results`` (the first naming a method gives its LR; seeds at
    that LR are pooled), and a line for each result left out because it ran under another protocol
    than the first (steps, data, precision, scoring: its numbers would not be comparable)."""
    merged = dict(next((r for r in results if "settings" in r), results[0]), methods={})
    want, refused = _protocol(merged), []
    for name, r in zip(names, results):
        if "settings" in r and _protocol(r) != want:
            diff = ", ".join(f"{k} {v!r} vs {want[k]!r}" for k, v in _protocol(r).items() if v != want[k])
            refused.append(f"not merged: {name} was run under another protocol ({diff})")
            continue
        for m, v in r["methods"].items():
            have = merged["methods"].get(m)
            merged["methods"][m] = v if have is None else _merge_seeds(have, v)
    return merged, refused


def commonsense_report(paths: list, merge_png: str | None = None) -> int:
    import json as _json
    finished = []
    for p in paths:
        result = _json.loads(Path(p).read_text())
        if "methods" not in result:      # a .partial.json: the runs finished so far
            print(f"### {p} (unfinished): the runs finished so far\n")
            for m, rs in result.get("runs", {}).items():
                for r in rs:
                    per = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["accuracy"].items())
                    print(f"- {m} lr={r['lr']:g} seed={r['seed']}: mean {100 * r['mean_accuracy']:.1f}% ({per}); "
                          f"train {r['train_s'] / 60:.1f} min, eval {r['eval_s'] / 60:.1f} min, load {r['load_avg']}")
            print()
            runs = {m: rs for m, rs in result.get("runs", {}).items() if rs}
            picked = {m: cs_pick(rs) if m != "base" else rs[0]["lr"] for m, rs in runs.items()}
            finished.append({"methods": cs_summarize(list(runs), runs, picked, {})})
            continue
        print(cs_header(result) + "\n")
        print(f"`{result.get('command', '?')}`\n")
        print(cs_table(result) + "\n")
        paired = cs_paired(result)
        if paired:
            print(paired + "\n")
        curves = cs_curves(result)
        if curves:
            print(curves + "\n")
        cs_plot(result, Path(p).with_suffix(".png"))
        finished.append(result)
    if len(finished) > 1:
        merged, refused = cs_merge(finished, paths)
        for line in refused:
            print(line + "\n")
        print(f"### merged: {', '.join(merged['methods'])}\n")
        print(cs_table(merged) + "\n")
        paired = cs_paired(merged)
        if paired:
            print(paired + "\n")
        if merge_png:     # --json OUT with --report: the merged table as JSON, its plot beside it
            out = Path(merge_png)
            if out.suffix == ".json":
                out.write_text(json.dumps(merged, indent=1) + "\n")
            if "settings" in merged:
                cs_plot(merged, out.with_suffix(".png"))
    return 0


def commonsense_main(args, fixed: dict) -> int:
    import torch
    common.quiet()
    quick = args.quick
    model_name = "stories260K" if quick else "smollm2"
    methods = [m for m in (args.methods or CS_METHODS)]
    bad = [m for m in methods if m not in CS_METHODS + CS_EXTRA]
    if bad:
        _die(f"--methods: {', '.join(bad)} not in the commonsense task ({', '.join(CS_METHODS + CS_EXTRA)})")
    fmt = args.answer_format or CS_DEFAULT_FORMAT
    data_dir = cs_data_dir(args.data_dir, quick)
    eval_files = args.eval_files or [str(data_dir / f"{n}_dev.jsonl") for n in CS_FILES]
    for f in eval_files:
        if not Path(f).is_file():
            _die(f"--eval-files: {f}: no such file")
    if quick:
        steps, micro, max_length, n_rows, limit, warmup = 2, 2, 512, 16, args.eval_questions or 3, 1
    else:
        steps, micro, max_length, n_rows, limit, warmup = (args.steps, args.micro_batch, args.max_length,
                                                           args.train_rows, args.eval_questions, args.warmup)
    seeds = args.seeds if args.seeds is not None else (3 if args.sweep and not quick else 1)
    torch.set_num_threads(args.threads or torch.get_num_threads())

    t_start = time.time()
    mix = cs_train_mix(data_dir, n_rows)
    train, pad, tok = cs_train_data(mix, fmt, max_length, model_name)
    questions = cs_questions(eval_files, fmt, limit)
    print(f"commonsense: {model_name}, {len(mix)} training rows -> {len(train)} packed rows of <= {max_length} "
          f"tokens; {len(questions)} eval questions from {len(eval_files)} file(s); answer format {fmt!r}; "
          f"{torch.get_num_threads()} threads; load {common._loads()}", flush=True)
    if args.bf16 == "auto" and not quick:
        meas = cs_measure_bf16(model_name, train, pad, micro)
        bf16 = meas["speedup"] > 1.2
        print(f"bf16 autocast check (fwd+bwd of one {micro} x {max_length} batch, all parameters trainable): "
              f"fp32 {meas['fp32_s']:.2f} s, bf16 {meas['bf16_s']:.2f} s ({meas['speedup']:.2f}x) -> "
              f"{'bf16' if bf16 else 'fp32'}", flush=True)
    else:
        meas, bf16 = None, args.bf16 == "on"

    kw = dict(model_name=model_name, train=train, pad=pad, tok=tok, questions=questions, steps=steps,
              micro_batch=micro, warmup=warmup, bf16=bf16, answer_format=fmt, verbose=not quick,
              eval_at=tuple(args.eval_at))
    runs = {m: [] for m in methods}

    def do(m, lr, seed):
        r = cs_run(m, lr, seed, **kw)
        runs[m].append(r)
        per = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["accuracy"].items())
        print(f"  {m:9s} lr={lr:g} seed={seed} mean={100 * r['mean_accuracy']:.2f}% ({per}); "
              f"train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s, loss {r['train_loss_last']}, "
              f"load {r['load_avg']}", flush=True)
        if args.json:        # partial results survive an interrupted run
            common.write_json(Path(args.json).with_suffix(".partial.json"), {"runs": runs})

    grids = {}
    for m in methods:
        if m == "base":
            grids[m] = []
        elif m in fixed:
            grids[m] = [fixed[m]]
        elif args.sweep:
            grids[m] = list(CS_GRIDS[m])[:2] if quick else list(CS_GRIDS[m])   # quick: the plumbing only
        else:
            grids[m] = [CHOSEN_LRS[m]]
    # 1) base once; each method's grid on seed 0 (one point without --sweep).
    for m in methods:
        for lr in (grids[m] or [0.0]):
            do(m, lr, args.first_seed)
            if m == "base":
                break
    picked = {m: (cs_pick(runs[m]) if grids[m] else 0.0) for m in methods}
    # 2) the picked LR on the other seeds (base is deterministic: one evaluation).
    for s in range(args.first_seed + 1, args.first_seed + seeds):
        for m in methods:
            if grids[m]:
                do(m, picked[m], s)

    result = dict(methods=cs_summarize(methods, runs, picked, grids),
                  settings=dict(task="commonsense", model="SmolLM2-135M-Instruct" if not quick else "stories260K",
                                data_dir=str(data_dir), eval_files=[str(f) for f in eval_files],
                                eval_questions_per_file=limit, train_rows=len(mix), packed_rows=len(train),
                                steps=steps, micro_batch=micro, max_length=max_length, warmup=warmup,
                                schedule="cosine", optimizer="AdamW(wd=0), clip 1.0", seeds=seeds,
                                sweep=bool(args.sweep), answer_format=fmt, template="Alpaca", bf16=bf16,
                                scoring=CS_SCORING, loss="logits at target positions only",
                                bf16_check=meas, quick=quick,
                                mean_accuracy="unweighted mean over eval files of each file's accuracy "
                                              "(pooled_accuracy: over all questions)"),
                  machine=common.machine("cpu", 1, "none") | {"threads": torch.get_num_threads()},
                  wall_s=time.time() - t_start, command="python " + " ".join(sys.argv))
    out = Path(args.json) if args.json else Path(args.out_dir) / f"commonsense_{fmt}{'_quick' if quick else ''}.json"
    common.write_json(out, result)
    partial = out.with_suffix(".partial.json")
    if partial.exists():
        partial.unlink()
    cs_plot(result, out.with_suffix(".png"))
    print("\n" + cs_header(result) + "\n")
    print(cs_table(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
