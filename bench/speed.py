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
              forward/backward/step: the engine floor (docs/DESIGN.md "ZeRO-3 rules").
- ``propulsion``: ``propulsion_ds.inject`` (k=15, all decoder linears).
- ``ia3``:    peft IA3 on the same 7 linears, all output-scaled (see ``common.ia3_config``).
- ``lora``:   peft LoRA r=8 (alpha 16) on the same 7 linears.
- ``full``:   every parameter trains (the upper bound).
- ``prop_slice`` (opt-in, ``--rows ... prop_slice``): propulsion-ds with the hook it had before
              this benchmark (each target slices the delta, out-of-place multiply): before/after.

Timing: ONE process group holds an engine per row; after warm-up the rows take turns in rounds
(order reversed every other round: ABBA), so drift in machine load hits every row alike. A step's
time is the slowest rank's; the table reports the median over all measured steps. With
``--group-size N`` the rows are timed in several process groups, one after another, each with its
own engine floor and at most N other rows (fewer engines alive at once: the real model's six
engines did not fit one process group on a loaded machine); every ratio is then to the floor of the
row's own group, and ``× bare`` of a later group's row goes through its floor (row/floor × floor/bare).

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

Files: this one is the command line and the launcher; ``speed_rows.py`` what each row trains,
``speed_worker.py`` what runs inside the ranks, ``speed_report.py`` the ratios, tables and chart.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:                 # imported as bench.speed (the tests)
    from . import common
    from .speed_report import compare_stages, merge_groups, plot, stages_table, summarize, table
    from .speed_rows import EXTRA_ROWS, MODELS, ORDER, ROWS
    from .speed_worker import worker_memory, worker_time
else:                           # run as a file (also by torchrun): bench/ is sys.path[0]
    import common
    from speed_report import compare_stages, merge_groups, plot, stages_table, summarize, table
    from speed_rows import EXTRA_ROWS, MODELS, ORDER, ROWS
    from speed_worker import worker_memory, worker_time

def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--group-size", dest="group_size", type=int, default=None,
                    help="time the rows in several process groups, one after another: each holds the "
                         "engine floor and at most N other rows (bare joins the first), so fewer engines "
                         "live at once; every ratio is to the floor of the row's own group "
                         "(default: all rows in one group)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step, 1 round (smoke test)")
    ap.add_argument("--out-dir", default=str(common.RESULTS))
    ap.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
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

    _launch(args, models)
    return 0


def _launch(args, models: list) -> None:
    """Every model and ZeRO stage, one after another, each in fresh process groups."""
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


def timing_groups(rows: list, size: int | None) -> list:
    """The rows of each timing process group: all in one without ``size``; else the floor plus
    at most ``size`` other rows per group (bare in the first), in ORDER."""
    if not size or "floor" not in rows:
        return [list(rows)]
    others = [r for r in ORDER if r in rows and r not in ("bare", "floor")]
    chunks = [others[i:i + size] for i in range(0, len(others), size)] or [[]]
    head = [r for r in ("bare", "floor") if r in rows]
    return [head + chunks[0]] + [["floor"] + c for c in chunks[1:]]


def _run_model(args) -> dict:
    """One ZeRO stage: the timing process group(s), then a fresh one per row for memory."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        groups = timing_groups(args.rows, args.group_size)
        parts = []
        for i, rows in enumerate(groups):
            _torchrun(args, "time", rows, Path(tmp) / f"time_{i}.json")
            parts.append(json.loads((Path(tmp) / f"time_{i}.json").read_text()))
            parts[-1]["load_avg_end"] = common.load_average()
        result = merge_groups(parts)
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
    groups = result.get("groups") or []
    for i, g in enumerate(groups if len(groups) > 1 else []):
        print(f"timing group {i + 1}: {' '.join(g['rows'])} — {g['date']}, load 1/5/15 min "
              f"{g['load_avg_1_5_15']} ({g['load_avg_end']:.2f} at its end)" + ("\n" if i == len(groups) - 1 else ""))
    print(table(result))
    if result.get("targets"):
        print("\ntargets:", json.dumps(result["targets"]))
    sys.stdout.flush()


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
