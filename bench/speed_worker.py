"""What bench/speed.py runs inside each torchrun rank: the timing worker (rows interleaved in
rounds) and the memory worker (one row in a fresh process group)."""
from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

if __package__:                 # imported as bench.speed_worker (the tests)
    from . import common
    from .speed_rows import ORDER, Row, make_batches, settings
else:                           # bench/speed.py runs as a file: bench/ is sys.path[0]
    import common
    from speed_rows import ORDER, Row, make_batches, settings


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
    from propulsion_ds.config.deepspeed import resolve_deepspeed
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


def _build_rows(args, ds_config, device):
    """(rows by name, the HfDeepSpeedConfig to keep alive while they train)."""
    rows = {}
    if "bare" in args.rows:                      # before HfDeepSpeedConfig: a plain model
        rows["bare"] = Row("bare", args.model, ds_config, device, args.dtype)
    from transformers.integrations import HfDeepSpeedConfig
    keepalive = HfDeepSpeedConfig(ds_config)      # transformers holds only a weakref
    for name in args.rows:
        if name != "bare":
            rows[name] = Row(name, args.model, ds_config, device, args.dtype)
    return rows, keepalive


def _interleave(rows: dict, order: list, batches: list, spec: dict, device) -> dict:
    """Warm-up, then the measured rounds (order reversed every other round: ABBA); each row's
    wall and CPU times land in ``row.times`` / ``row.cpu_times``. Returns the losses per row."""
    import torch.distributed as tdist
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
        for name in (order if rnd % 2 == 0 else order[::-1]):
            for j in range(spec["per_round"]):
                wall, cpu = run(rows[name], step + j)
                rows[name].times.append(wall)
                rows[name].cpu_times.append(cpu)
        step += spec["per_round"]
    return losses


def _row_result(row, losses: list, tokens: float) -> dict:
    """One row's numbers, each the slowest rank's (a collective: every rank calls it in order)."""
    times, cpu = _gather_max(row.times), _gather_max(row.cpu_times)
    opt_bytes = _gather_max([float(row.optimizer_state_bytes())])[0]
    return {"trainable": row.trainable, "optimizer_state_bytes_per_rank": int(opt_bytes),
            "step_times_s": times, "median_step_s": statistics.median(times),
            "cpu_times_s": cpu, "median_cpu_s": statistics.median(cpu),
            "tokens_per_step": tokens, "first_loss": losses[0], "last_loss": losses[-1]}


def worker_time(args) -> None:
    """All rows in one process group, measured in interleaved rounds."""
    import torch.distributed as tdist
    rank, world, device, ds_config, spec = _setup(args)
    n_steps = spec["warmup"] + spec["rounds"] * spec["per_round"]
    batches = make_batches(args.model, spec["micro_batch"], spec["seq"], rank, world, device, n_steps)
    from propulsion_ds.data import real_tokens
    tokens = sum(float(real_tokens(b)) for b in batches) / len(batches) * world

    rows, keepalive = _build_rows(args, ds_config, device)     # noqa: F841  (alive while training)
    order = [r for r in ORDER if r in rows]
    losses = _interleave(rows, order, batches, spec, device)
    out = {name: _row_result(rows[name], losses[name], tokens) for name in order}
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


def _memory_now(device) -> int:
    import torch
    return torch.cuda.memory_allocated() if device.type == "cuda" else common.current_rss_bytes()


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
    base = _memory_now(device)
    keepalive = None
    if name != "bare":
        from transformers.integrations import HfDeepSpeedConfig
        keepalive = HfDeepSpeedConfig(ds_config)    # noqa: F841
    row = Row(name, args.model, ds_config, device, args.dtype)
    gc.collect()
    # The training steps' own peak, without the load peak (checkpoint pages, conversion copies).
    built = _memory_now(device)
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
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
