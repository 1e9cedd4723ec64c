"""Step time, optimizer state and memory of propulsion-ds against its floors and against peft.

    python bench/speed.py                         # both models, 2 CPU ranks (launches torchrun itself)
    python bench/speed.py --model stories260K --steps 3 --quick     # smoke test
    python bench/speed.py --model smollm2 --zero 2 3               # real SmolLM2-135M, ZeRO-2 and -3
    torchrun --nproc_per_node 8 bench/speed.py --device cuda        # launched by torchrun: timing only

Every row uses the same DeepSpeed config (configs/deepspeed/zero3.json, or zero2.json with
``--zero 2``: the frozen base replicated, only the trainable tensors' gradients and optimizer state
sharded; resolved by the engine's own ``resolve_deepspeed``), the same model, the same micro-batches and sequence length, and the same
loop (``engine(**batch)``, ``engine.backward``, ``engine.step``, ``loss.item()``):

- ``bare``:   frozen base, plain (not partitioned) model, forward + backward to ``inputs_embeds``
              only, no DeepSpeed: the arithmetic lower bound.
- ``floor``:  frozen base + ONE trainable scalar on the root module multiplying the input
              embeddings' output (forward hook on ``embed_tokens``), through DeepSpeed's full
              forward/backward/step: the engine floor (DESIGN §3).
- ``propulsion``: ``propulsion_ds.inject`` (k=15, all decoder linears).
- ``ia3``:    peft IA3 on the same 7 linears, all output-scaled (see ``common.ia3_config``).
- ``lora``:   peft LoRA r=8 (alpha 16) on the same 7 linears.
- ``full``:   every parameter trains (the upper bound).
- ``prop_slice`` (opt-in, ``--rows ... prop_slice``): propulsion-ds with the hook it had before
              this benchmark (each target slices the delta, out-of-place multiply): before/after.

Timing: ONE process group holds an engine per row; after warm-up the rows take turns in rounds
(order reversed every other round: ABBA), so drift in machine load hits every row alike. A step's
time is the slowest rank's; the table reports the median over all measured steps.

Memory: RSS peaks are process-wide, so by default each row's memory is measured in a FRESH
process group that builds only that row and runs a few steps; we report the peak RSS per rank
(max over ranks; on GPU ``max_memory_allocated``) and its increase over the same process's RSS
right before the model is built (after imports, process group and data). On CPU those processes
run with glibc's mmap threshold fixed at 64 KiB and trimming on, so a freed tensor leaves RSS and
the peak follows live tensors, not the allocator's caching (repeat runs agree to ~0.2%). Launched under an
outside torchrun, the script measures timing only (memory needs fresh processes). The memory
processes also reset the kernel's peak-RSS mark once the row is built (``train_peak``): the peak of
the training steps alone, without the load-time peak of reading the checkpoint.

MFU (``--device cuda``): nanoGPT-style, model FLOPs = 4 N per token for a frozen base (forward 2N,
activation gradients 2N) and 6 N for full fine-tuning, over the GPUs' bf16 peak
(``propulsion_ds.train.metrics``); on CPU there is no peak to divide by ("–").
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

ROWS = ["bare", "floor", "propulsion", "ia3", "lora", "full"]
EXTRA_ROWS = ["prop_slice"]          # opt-in: the hook before bench/ (for before/after tables)
LABELS = {"bare": "frozen base fwd+bwd (no DeepSpeed)", "floor": "engine floor (1 scalar)",
          "propulsion": "propulsion-ds k=15", "prop_slice": "propulsion-ds k=15, per-target slice hook (before)",
          "ia3": "peft IA3", "lora": "peft LoRA r=8", "full": "full fine-tuning"}
ORDER = ["bare", "floor", "propulsion", "prop_slice", "ia3", "lora", "full"]
MODELS = {
    # micro-batch, sequence length, warm-up steps, rounds x steps per round (>= 20 measured steps)
    "stories260K": dict(micro_batch=8, seq=128, warmup=5, rounds=40, per_round=2),
    "synth100m": dict(micro_batch=2, seq=128, warmup=2, rounds=20, per_round=2),
    # the real SmolLM2-135M-Instruct (scripts/fetch_smollm2.sh): 10 measured steps per row
    "smollm2": dict(micro_batch=2, seq=128, warmup=2, rounds=5, per_round=2),
}


# ------------------------------------------------------------------------------------ building
def _raw_model(model_name: str, dtype: str = "fp32"):
    """The base model; under an alive HfDeepSpeedConfig (ZeRO-3) transformers builds it in zero.Init."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if model_name in ("stories260K", "smollm2"):
        model = AutoModelForCausalLM.from_pretrained(str(common.model_path(model_name)), dtype=dt)
    else:
        model = AutoModelForCausalLM.from_config(common.synthetic_llama_config(), dtype=dt)
    model.config.use_cache = False
    return model


class _SliceHook:
    """The forward hook propulsion-ds had before bench/ (commit 5a57a0a), kept for before/after
    rows: each target slices the flat delta and computes its own (1+delta)**k, and autograd's
    out-of-place multiply saves y (its upcast copy for bf16) for the scale's gradient."""

    def __init__(self, root, lo, hi, degree):
        self.root, self.lo, self.hi, self.degree = root, lo, hi, degree

    def __call__(self, module, args, output):
        import torch
        from propulsion_ds.method.propulsion import DELTA_NAME, scale_from_delta
        scale = scale_from_delta(getattr(self.root, DELTA_NAME)[:, self.lo:self.hi], self.degree)
        dtype = torch.promote_types(output.dtype, scale.dtype)
        return (output.to(dtype) * scale.to(dtype)).to(output.dtype)


class _EmbedScale:
    """Forward hook y -> y * root.bench_scale (an object so the root is looked up, not captured)."""

    def __init__(self, root):
        self.root = root

    def __call__(self, module, args, output):
        return output * self.root.bench_scale


def build_model(row: str, model_name: str, dtype: str = "fp32"):
    """(model, trainable params) for one row; the bare row must be built before HfDeepSpeedConfig."""
    import torch
    from torch import nn
    model = _raw_model(model_name, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if row == "floor":
        model.register_parameter("bench_scale", nn.Parameter(torch.ones(1, dtype=model.dtype)))
        model.get_input_embeddings().register_forward_hook(_EmbedScale(model))
    elif row in ("propulsion", "prop_slice"):
        from propulsion_ds import PropulsionConfig, inject
        from propulsion_ds.method.propulsion import get_state
        inject(model, PropulsionConfig(degree=15, targets="all-linear"))
        if row == "prop_slice":
            state, modules = get_state(model), dict(model.named_modules())
            for handle in state.handles:
                handle.remove()
            state.handles = [modules[s.name].register_forward_hook(
                _SliceHook(model, s.offset, s.offset + s.size, 15)) for s in state.slots]
    elif row in ("ia3", "lora"):
        from peft import get_peft_model
        model = get_peft_model(model, common.ia3_config() if row == "ia3" else common.lora_config(8))
    elif row == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif row != "bare":
        raise ValueError(f"unknown row {row!r}")
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


class Row:
    """One row's model (and engine) plus its step function and measured step times."""

    def __init__(self, name, model_name, ds_config, device, dtype="fp32"):
        import torch
        self.name, self.times, self.cpu_times = name, [], []
        self.model, params = build_model(name, model_name, dtype)
        self.trainable = common.count_trainable(self.model)
        self.engine = None
        if name == "bare":
            self.model.to(device)
            self.embed = self.model.get_input_embeddings()
        else:
            import deepspeed
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
            self.engine, *_ = deepspeed.initialize(model=self.model, model_parameters=params,
                                                   optimizer=opt, config=copy.deepcopy(ds_config))

    def step(self, batch) -> float:
        if self.engine is None:
            with __import__("torch").no_grad():
                emb = self.embed(batch["input_ids"])
            emb.requires_grad_(True)
            rest = {k: v for k, v in batch.items() if k != "input_ids"}   # labels, position_ids or mask
            out = self.model(inputs_embeds=emb, **rest)
            out.loss.backward()
            return out.loss.item()
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        self.engine.step()
        return out.loss.item()

    def optimizer_state_bytes(self) -> int:
        """This rank's optimizer memory: fp32 master partitions + optimizer state (m, v, step).

        DeepSpeed's ZeRO wrapper (``engine.optimizer``) keeps the fp32 master partitions
        (``fp32_partitioned_groups_flat`` at stage 3, ``single_partition_of_fp32_groups`` at 1/2)
        and swaps them into the torch optimizer only inside ``step``; the torch optimizer (reached
        by walking ``.optimizer``) keys its state by them. Counted once each, by identity.
        """
        if self.engine is None:
            return 0
        import torch
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if torch.is_tensor(t) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        model_ids = {id(p) for p in self.model.parameters()}
        opt = self.engine.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            for t in getattr(opt, attr, None) or []:
                add(t)
        while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in model_ids:          # at ZeRO 0 these are the model's own params
                    add(p)
        for key, st in opt.state.items():
            if id(key) not in model_ids:
                add(key)
            for t in st.values():
                add(t)
        return total


def make_batches(model_name, micro_batch, seq, rank, world, device, n):
    """This rank's first ``n`` micro-batches of tinyshakespeare (identical for every row)."""
    from propulsion_ds import data
    tok = common.tokenizer(model_name)
    train, _ = common.shakespeare(tok, seq)
    pad = data.pad_token_id(tok)
    plan = data.epoch_batches(train, micro_batch, rank, world, seed=0, epoch=0)
    plan = (plan * (n // len(plan) + 1))[:n]
    return [{k: v.to(device) for k, v in data.get_batch(train, idx, pad, max_length=seq).items()}
            for idx in plan]


# ------------------------------------------------------------------------------------ worker
def _setup(args):
    import torch
    common.quiet()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from propulsion_ds import distributed as pdist
    pdist.init_distributed()
    rank, world = pdist.rank(), pdist.world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    from propulsion_ds.config.load import resolve_deepspeed
    spec = settings(args)
    ds_config = resolve_deepspeed(common.run_config(spec["micro_batch"], spec["seq"], args.dtype,
                                                    zero_stage=args.zero[0]), world)
    return rank, world, device, ds_config, spec


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gather_max(values: list) -> list:
    """Element-wise max over ranks of a list of floats."""
    import torch
    import torch.distributed as tdist
    t = torch.tensor(values, dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.cpu().tolist()


def worker_time(args) -> None:
    """All rows in one process group, measured in interleaved rounds."""
    import torch
    import torch.distributed as tdist
    rank, world, device, ds_config, spec = _setup(args)
    rows_wanted = args.rows
    n_steps = spec["warmup"] + spec["rounds"] * spec["per_round"]
    batches = make_batches(args.model, spec["micro_batch"], spec["seq"], rank, world, device, n_steps)
    from propulsion_ds.data import real_tokens
    tokens = sum(float(real_tokens(b)) for b in batches) / len(batches) * world

    rows = {}
    if "bare" in rows_wanted:                      # before HfDeepSpeedConfig: a plain model
        rows["bare"] = Row("bare", args.model, ds_config, device, args.dtype)
    from transformers.integrations import HfDeepSpeedConfig
    keepalive = HfDeepSpeedConfig(ds_config)        # noqa: F841  (transformers holds a weakref)
    for name in rows_wanted:
        if name != "bare":
            rows[name] = Row(name, args.model, ds_config, device, args.dtype)
    order = [r for r in ORDER if r in rows]
    losses = {r: [] for r in order}

    def run(row, i):
        tdist.barrier()
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses[row.name].append(row.step(batches[i]))
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for i in range(spec["warmup"]):
        for name in order:
            run(rows[name], i)
    step = spec["warmup"]
    for rnd in range(spec["rounds"]):
        seq_rows = order if rnd % 2 == 0 else order[::-1]
        for name in seq_rows:
            for j in range(spec["per_round"]):
                wall, cpu = run(rows[name], step + j)
                rows[name].times.append(wall)
                rows[name].cpu_times.append(cpu)
        step += spec["per_round"]

    out = {}
    for name in order:
        row = rows[name]
        times, cpu = _gather_max(row.times), _gather_max(row.cpu_times)
        opt_bytes = _gather_max([float(row.optimizer_state_bytes())])[0]
        out[name] = {"trainable": row.trainable, "optimizer_state_bytes_per_rank": int(opt_bytes),
                     "step_times_s": times, "median_step_s": statistics.median(times),
                     "cpu_times_s": cpu, "median_cpu_s": statistics.median(cpu),
                     "tokens_per_step": tokens, "first_loss": losses[name][0], "last_loss": losses[name][-1]}
    any_row = rows.get("floor") or next(iter(rows.values()))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in any_row.model.parameters()) \
        - (any_row.trainable if any_row.name != "full" else 0)
    if rank == 0:
        from propulsion_ds.train.metrics import gpu_peak_flops
        result = {"model": args.model, "settings": spec, "ds_config": ds_config, "zero_stage": args.zero[0],
                  "dtype": args.dtype, "n_params": n_params,
                  "peak_flops_per_device": gpu_peak_flops() if device.type == "cuda" else None,
                  "machine": common.machine(device.type, world, tdist.get_backend()), "rows": out}
        common.write_json(Path(args.out), result)
    tdist.barrier()


def worker_memory(args) -> None:
    """Build ONE row in this fresh process group, run a few steps, report peak memory per rank."""
    import torch
    import torch.distributed as tdist
    rank, world, device, ds_config, spec = _setup(args)
    (name,) = args.rows
    n = spec["warmup"] + args.memory_steps
    batches = make_batches(args.model, spec["micro_batch"], spec["seq"], rank, world, device, n)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = common.current_rss_bytes()
    keepalive = None
    if name != "bare":
        from transformers.integrations import HfDeepSpeedConfig
        keepalive = HfDeepSpeedConfig(ds_config)    # noqa: F841
    row = Row(name, args.model, ds_config, device, args.dtype)
    gc.collect()
    # The training steps' own peak, without the load peak (checkpoint pages, conversion copies).
    if device.type == "cuda":
        built = torch.cuda.memory_allocated()
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        built = common.current_rss_bytes()
        load_peak = common.hwm_rss_bytes()
        common.reset_peak_rss()
    for i in range(n):
        row.step(batches[i])
    tdist.barrier()
    if device.type == "cuda":
        train_peak = torch.cuda.max_memory_allocated()
        peak = max(train_peak, load_peak)
    else:
        train_peak = common.hwm_rss_bytes()
        peak = common.peak_rss_bytes()          # ru_maxrss: whole life, is not reset
    vals = [0.0] * (4 * world)
    vals[4 * rank:4 * rank + 4] = [float(peak), float(base), float(train_peak), float(built)]
    vals = _gather_max(vals)
    pick = lambda j: [vals[4 * r + j] for r in range(world)]  # noqa: E731
    if rank == 0:
        common.write_json(Path(args.out), {"row": name, "peak_per_rank": pick(0), "base_per_rank": pick(1),
                                           "train_peak_per_rank": pick(2), "built_per_rank": pick(3),
                                           "kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS"})
    tdist.barrier()


# ------------------------------------------------------------------------------------ launcher
def settings(args) -> dict:
    spec = dict(MODELS[args.model])
    if args.micro_batch:
        spec["micro_batch"] = args.micro_batch
    if args.seq:
        spec["seq"] = args.seq
    if args.quick:
        spec.update(warmup=1, rounds=1)
    if args.rounds:
        spec["rounds"] = args.rounds
    if args.warmup is not None:
        spec["warmup"] = args.warmup
    if args.steps:                                  # measured steps per row
        spec["per_round"] = max(1, -(-args.steps // spec["rounds"]))
    return spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, worker: str, rows: list, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", worker,
           "--model", args.model, "--device", args.device, "--out", str(out), "--rows", *rows,
           "--memory-steps", str(args.memory_steps), "--zero", str(args.zero[0]), "--dtype", args.dtype]
    for flag in ("steps", "micro_batch", "seq", "rounds", "warmup"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    if worker == "memory" and args.device == "cpu":
        # glibc: every allocation of 64 KiB or more gets its own mmap and goes back to the OS on
        # free, so peak RSS follows the peak of live tensors instead of the allocator's caching.
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    env.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(l for l in proc.stdout.splitlines() if "Warning" not in l)[-6000:]
        raise SystemExit(f"{worker} run for {args.model} {rows} failed (rc {proc.returncode}):\n{tail}")


def summarize(result: dict, memory: dict | None) -> dict:
    rows = result["rows"]
    bare = rows.get("bare", {}).get("median_step_s")
    floor = rows.get("floor", {}).get("median_step_s")
    floor_cpu = rows.get("floor", {}).get("median_cpu_s")
    per = result["settings"]["per_round"]
    for name, r in rows.items():
        t = r["median_step_s"]
        r["x_floor_cpu"] = r["median_cpu_s"] / floor_cpu if floor_cpu else None
        if "floor" in rows:
            # paired: this row's mean step over the floor's in the same round, median over rounds
            ft, rt = rows["floor"]["step_times_s"], r["step_times_s"]
            ratios = [sum(rt[i:i + per]) / sum(ft[i:i + per]) for i in range(0, len(rt), per)]
            r["x_floor_paired_rounds"] = ratios
            r["x_floor_paired"] = statistics.median(ratios)
        times = sorted(r["step_times_s"])
        r["p25_step_s"], r["p75_step_s"] = times[len(times) // 4], times[(3 * len(times)) // 4]
        r["tokens_per_s"] = r["tokens_per_step"] / t
        peak, n = result.get("peak_flops_per_device"), result.get("n_params")
        r["mfu"] = None
        if peak and n:
            from propulsion_ds.train.metrics import flops_per_token
            world = result["machine"]["ranks"]
            r["mfu"] = flops_per_token(n, trainable_weights=name == "full") * r["tokens_per_s"] / (peak * world)
        r["x_bare"] = t / bare if bare else None
        r["x_floor"] = t / floor if floor else None
        if memory and name in memory:
            m = memory[name]
            r["peak_mem_per_rank"] = max(m["peak_per_rank"])
            r["peak_mem_all_ranks"] = m["peak_per_rank"]
            r["mem_over_base"] = max(p - b for p, b in zip(m["peak_per_rank"], m["base_per_rank"]))
            r["memory_kind"] = m["kind"]
            if "train_peak_per_rank" in m:
                r["train_peak_per_rank"] = max(m["train_peak_per_rank"])
                r["train_peak_all_ranks"] = m["train_peak_per_rank"]
                r["base_all_ranks"] = m["base_per_rank"]
                r["train_over_base"] = max(p - b for p, b in zip(m["train_peak_per_rank"], m["base_per_rank"]))
    if memory and "floor" in memory:
        fl = rows["floor"]
        for r in rows.values():
            if "peak_mem_per_rank" in r:
                r["mem_vs_floor"] = r["peak_mem_per_rank"] / fl["peak_mem_per_rank"]
    if "propulsion" in rows:
        p = rows["propulsion"]
        targets = {"propulsion_le_1.05x_floor": p["x_floor"] is not None and p["x_floor"] <= 1.05,
                   "propulsion_le_1.05x_floor_paired": p.get("x_floor_paired") is not None
                   and p["x_floor_paired"] <= 1.05,
                   "propulsion_le_1.05x_floor_cpu_time": p["x_floor_cpu"] is not None and p["x_floor_cpu"] <= 1.05}
        peft = [rows[k]["median_step_s"] for k in ("ia3", "lora") if k in rows]
        if peft:
            targets["propulsion_below_both_peft"] = all(p["median_step_s"] < t for t in peft)
        if "lora" in rows and p["optimizer_state_bytes_per_rank"]:
            ratio = rows["lora"]["optimizer_state_bytes_per_rank"] / p["optimizer_state_bytes_per_rank"]
            targets["lora_opt_state_over_propulsion"] = ratio
            targets["opt_state_ge_10x_smaller_than_lora"] = ratio >= 10
        if "mem_vs_floor" in p:
            # Read as "costs at most 2% more than the floor"; being lower is better (the floor's
            # scalar on the embedding output makes ZeRO-3 gather the embedding in backward too).
            targets["memory_le_1.02x_floor"] = p["mem_vs_floor"] <= 1.02
            targets["memory_within_2pct_of_floor_both_ways"] = abs(p["mem_vs_floor"] - 1) <= 0.02
        result["targets"] = targets
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    mem = any("peak_mem_per_rank" in r for r in rows.values())
    kind = next((r["memory_kind"] for r in rows.values() if "memory_kind" in r), "peak RSS")
    headers = ["row", "trainable", "optimizer state / rank", "median step (ms) [p25–p75]", "tokens/s",
               "× bare", "× floor", "× floor, paired", "CPU ms/step", "CPU × floor"]
    mfu = any(r.get("mfu") for r in rows.values())
    if mfu:
        headers.append("MFU")
    train = any("train_peak_per_rank" in r for r in rows.values())
    if mem:
        headers += [f"{kind} / rank", "Δ over process base", "mem × floor"]
    if mem and train:
        headers += ["training-steps peak / rank", "Δ over process base (steps)"]
    out = []
    for name in ORDER:
        if name not in rows:
            continue
        r = rows[name]
        line = [LABELS[name], common.fmt_int(r["trainable"]), common.fmt_bytes(r["optimizer_state_bytes_per_rank"]),
                f"{1e3 * r['median_step_s']:.1f} [{1e3 * r['p25_step_s']:.1f}–{1e3 * r['p75_step_s']:.1f}]",
                f"{r['tokens_per_s']:,.0f}",
                "–" if r["x_bare"] is None else f"{r['x_bare']:.2f}",
                "–" if r["x_floor"] is None else f"{r['x_floor']:.3f}",
                f"{r['x_floor_paired']:.3f}" if r.get("x_floor_paired") is not None else "–",
                f"{1e3 * r['median_cpu_s']:.1f}",
                "–" if r["x_floor_cpu"] is None else f"{r['x_floor_cpu']:.3f}"]
        if mfu:
            line.append("–" if not r.get("mfu") else f"{100 * r['mfu']:.1f} %")
        if mem:
            line += [common.fmt_bytes(r.get("peak_mem_per_rank")), common.fmt_bytes(r.get("mem_over_base")),
                     f"{r['mem_vs_floor']:.3f}" if "mem_vs_floor" in r else "–"]
        if mem and train:
            line += [common.fmt_bytes(r.get("train_peak_per_rank")), common.fmt_bytes(r.get("train_over_base"))]
        out.append(line)
    return common.markdown_table(headers, out)


SHORT = {"bare": "bare fwd+bwd\n(no DeepSpeed)", "floor": "engine floor\n(1 scalar)",
         "propulsion": "propulsion-ds\nk=15", "prop_slice": "propulsion-ds\n(before: slices)",
         "ia3": "peft IA3", "lora": "peft LoRA\nr=8", "full": "full\nfine-tuning"}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in ORDER if r in result["rows"]]
    R = result["rows"]
    med = [1e3 * R[r]["median_step_s"] for r in rows]
    lo = [m - 1e3 * R[r]["p25_step_s"] for m, r in zip(med, rows)]
    hi = [1e3 * R[r]["p75_step_s"] - m for m, r in zip(med, rows)]
    colors = {"bare": "#999999", "floor": "#555555", "propulsion": "#d62728", "prop_slice": "#ff9896",
              "ia3": "#1f77b4", "lora": "#2ca02c", "full": "#9467bd"}
    mem = all("peak_mem_per_rank" in R[r] for r in rows)
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(12 if mem else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    x = range(len(rows))
    ax.bar(x, med, yerr=[lo, hi], color=[colors[r] for r in rows], capsize=4)
    if "floor" in R:
        f = 1e3 * R["floor"]["median_step_s"]
        ax.axhline(f, color="#555555", ls="--", lw=1, label="engine floor")
        ax.axhline(1.05 * f, color="#d62728", ls=":", lw=1, label="1.05 × floor")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(list(x), [SHORT[r] for r in rows], fontsize=7)
    ax.set_ylabel("median step time (ms), bars: p25–p75")
    m, st = result["machine"], result["settings"]
    ax.set_title(f"{result['model']}: ZeRO-{result.get('zero_stage', 3)}, {m['ranks']} ranks, {m['device']}, micro-batch "
                 f"{st['micro_batch']} × {st['seq']} tokens", fontsize=9)
    if mem:
        ax2 = axes[0][1]
        ax2.bar(x, [R[r]["peak_mem_per_rank"] / 2**20 for r in rows], color=[colors[r] for r in rows])
        ax2.set_xticks(list(x), [SHORT[r] for r in rows], fontsize=7)
        ax2.set_ylabel(f"{R[rows[0]].get('memory_kind', 'peak')} per rank (MiB)")
        ax2.set_title("memory, each row in a fresh process group", fontsize=9)
        if "floor" in R:
            ax2.axhline(R["floor"]["peak_mem_per_rank"] / 2**20, color="#555555", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ORDER,
                    help=f"rows to run (default: {' '.join(ROWS)}; opt-in: {' '.join(EXTRA_ROWS)})")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, all GPUs on cuda)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per row (default: the model's)")
    ap.add_argument("--micro-batch", dest="micro_batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--memory-steps", type=int, default=5, help="steps run in each fresh memory process")
    ap.add_argument("--zero", type=int, nargs="+", default=[3], choices=[2, 3],
                    help="ZeRO stage(s): 3 partitions the frozen base; 2 replicates it and shards only "
                         "the trainable tensors' state. Several: one run each, then a side-by-side table")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on cuda")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default: the model's)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default: the model's)")
    ap.add_argument("--memory-rows", dest="memory_rows", nargs="+", default=None, choices=ORDER,
                    help="rows measured in fresh memory processes (default: all --rows)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step, 1 round (smoke test)")
    ap.add_argument("--out-dir", default=str(common.RESULTS))
    ap.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"

    if args.worker == "time":
        worker_time(args)
        return 0
    if args.worker == "memory":
        worker_memory(args)
        return 0

    models = list(MODELS) if args.model == "all" else [args.model]
    outside = "RANK" in os.environ or "LOCAL_RANK" in os.environ
    if outside:                                     # launched by torchrun/deepspeed: timing only
        if len(models) > 1:
            raise SystemExit("under an outside launcher pass one --model")
        args.model = models[0]
        args.out = args.out or tempfile.mktemp(suffix=".json")
        worker_time(args)
        if int(os.environ.get("RANK", "0")) == 0:
            result = summarize(json.loads(Path(args.out).read_text()), None)
            _report(result, args)
        return 0

    if args.nproc is None:
        if args.device == "cuda":
            import torch
            args.nproc = torch.cuda.device_count()
        else:
            args.nproc = 2
    stages = list(dict.fromkeys(args.zero))
    for model in models:
        args.model = model
        by_stage = {}
        for stage in stages:
            args.zero = [stage]
            by_stage[stage] = _run_model(args)
            _report(by_stage[stage], args, tagged=len(stages) > 1 or stage != 3)
        if len(stages) > 1:
            _report_stages(by_stage, args)
    return 0


def _run_model(args) -> dict:
    """One ZeRO stage: the timing process group, then a fresh one per row for memory."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        _torchrun(args, "time", args.rows, Path(tmp) / "time.json")
        result = json.loads((Path(tmp) / "time.json").read_text())
        memory = None
        if not args.no_memory:
            memory = {}
            for row in (args.memory_rows or args.rows):
                path = Path(tmp) / f"mem_{row}.json"
                _torchrun(args, "memory", [row], path)
                memory[row] = json.loads(path.read_text())
        result["wall_s"] = time.time() - t0
        result["memory_method"] = None if memory is None else (
            "each row in a fresh process group: peak per rank after warm-up + "
            f"{args.memory_steps} steps; Δ = peak − RSS before the model build"
            + ("; glibc MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 MALLOC_ARENA_MAX=2 "
               "so freed tensors leave RSS" if args.device == "cpu" else "")
            + "; training-steps peak: the peak mark reset after the row is built")
        result["load_avg_end"] = common.load_average()
    return summarize(result, memory)


def _report(result: dict, args, tagged: bool = False) -> None:
    out_dir = Path(args.out_dir)
    suffix = (f"_zero{result['zero_stage']}" if tagged else "") + ("_quick" if args.quick else "")
    common.write_json(out_dir / f"speed_{result['model']}{suffix}.json", result)
    plot(result, out_dir / f"speed_{result['model']}{suffix}.png")
    m = result["machine"]
    print(f"\n### {result['model']} — ZeRO-{result.get('zero_stage', 3)}, {result.get('dtype', 'fp32')}, "
          f"{m['device']}{' ' + m['gpu'] if m.get('gpu') else ''}, {m['ranks']} ranks, {m['backend']}, {m['date']}, "
          f"{common.load_note(m['load_avg_1m'], m['cpu_cores'])} (1/5/15 min {m.get('load_avg_1_5_15')}; "
          f"{result.get('load_avg_end')} at the end), micro-batch {result['settings']['micro_batch']} × seq "
          f"{result['settings']['seq']}, {len(next(iter(result['rows'].values()))['step_times_s'])} "
          f"measured steps per row\n")
    print(table(result))
    if result.get("targets"):
        print("\ntargets:", json.dumps(result["targets"]))
    sys.stdout.flush()


def compare_stages(by_stage: dict) -> dict:
    """ZeRO-2 (replicated frozen base) against ZeRO-3, row by row, each against its own run's bare
    forward+backward; ``floor_overhead_removed``: the share of ZeRO-3's floor-over-bare cost that
    the replicated base does not pay, (x3 - x2) / (x3 - 1) with x = floor / bare."""
    z2, z3 = by_stage[2]["rows"], by_stage[3]["rows"]
    rows = {}
    for name in ORDER:
        if name in z2 and name in z3:
            a, b = z3[name], z2[name]
            rows[name] = {"zero3_ms": 1e3 * a["median_step_s"], "zero2_ms": 1e3 * b["median_step_s"],
                          "zero3_x_bare": a["x_bare"], "zero2_x_bare": b["x_bare"],
                          "zero2_over_zero3": b["median_step_s"] / a["median_step_s"],
                          "zero3_mem": a.get("train_peak_per_rank"), "zero2_mem": b.get("train_peak_per_rank"),
                          "zero3_opt": a["optimizer_state_bytes_per_rank"],
                          "zero2_opt": b["optimizer_state_bytes_per_rank"]}
    out = {"rows": rows}
    f = rows.get("floor")
    if f and f["zero3_x_bare"] and f["zero2_x_bare"] and f["zero3_x_bare"] > 1:
        out["floor_overhead_removed"] = (f["zero3_x_bare"] - f["zero2_x_bare"]) / (f["zero3_x_bare"] - 1)
    return out


def stages_table(cmp: dict) -> str:
    headers = ["row", "ZeRO-3 ms/step", "× bare", "ZeRO-2 ms/step", "× bare", "ZeRO-2 / ZeRO-3",
               "optimizer state / rank Z3 / Z2", "training-steps peak RSS / rank Z3 / Z2"]
    out = []
    for name, r in cmp["rows"].items():
        xb = lambda v: "–" if v is None else f"{v:.2f}"    # noqa: E731
        out.append([LABELS[name], f"{r['zero3_ms']:.0f}", xb(r["zero3_x_bare"]), f"{r['zero2_ms']:.0f}",
                    xb(r["zero2_x_bare"]), f"{r['zero2_over_zero3']:.3f}",
                    f"{common.fmt_bytes(r['zero3_opt'])} / {common.fmt_bytes(r['zero2_opt'])}",
                    f"{common.fmt_bytes(r['zero3_mem'])} / {common.fmt_bytes(r['zero2_mem'])}"])
    return common.markdown_table(headers, out)


def _report_stages(by_stage: dict, args) -> None:
    cmp = compare_stages(by_stage)
    m2, m3 = by_stage[2]["machine"], by_stage[3]["machine"]
    cmp["machines"] = {"zero2": m2, "zero3": m3}
    suffix = "_quick" if args.quick else ""
    common.write_json(Path(args.out_dir) / f"speed_{args.model}_zero2_vs_zero3{suffix}.json", cmp)
    print(f"\n### {args.model}: ZeRO-3 (partitioned base) vs ZeRO-2 (replicated frozen base) — "
          f"{m3['date']} / {m2['date']}, {common.load_note(m3['load_avg_1m'], m3['cpu_cores'])} / "
          f"{common.load_note(m2['load_avg_1m'], m2['cpu_cores'])}\n")
    print(stages_table(cmp))
    if "floor_overhead_removed" in cmp:
        print(f"\nthe replicated base removes {100 * cmp['floor_overhead_removed']:.0f}% of the ZeRO-3 engine "
              f"floor's cost over a bare forward+backward")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
