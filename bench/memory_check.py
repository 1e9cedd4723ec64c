"""The memory planner's estimate against the peak measured on the real model, per rank.

    bash scripts/fetch_smollm2.sh                   # SmolLM2-135M-Instruct, once
    python -m bench.memory_check                    # ZeRO-0, ZeRO-2, ZeRO-3, one after the other
    python -m bench.memory_check --layouts 3 --steps 4

Each layout runs in its own 2-rank CPU process group (torchrun, gloo) that builds the project's own
``Trainer`` from a run config (SmolLM2, fp32, tinyshakespeare packed to 128 tokens, micro-batch 2,
the shipped configs/deepspeed/zero{2,3}.json or plain ZeRO-0), so the DeepSpeed config is resolved
exactly as the trainer resolves it: ``resolve_deepspeed`` with the model's hidden size, "auto"
buckets h*h / 0.9*h*h / 10*h. It then runs ``Trainer.train`` for a few steps, reading the peak
after each optimizer step (the engine's ``step``), so the final checkpoint save is left out.

What is compared (the same quantity on both sides): the kernel's peak RSS (VmHWM) over the training
steps minus the same process's RSS right before the trainer builds the model (read inside
``AutoModelForCausalLM.from_pretrained``). The baseline holds the interpreter, the libraries (imported
and their kernels run once on a tiny LLaMA first, ``warm_up``), the gloo group, the tokenizer and the
tokenized data, which the planner does not model (on a GPU they are host memory). VmHWM is reset once the engine is built, so
the load-time peak of reading the checkpoint (the planner's host-memory figure) is left out. glibc
is told to mmap every block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves RSS
and RSS follows live tensors. The estimate is ``method_plan`` on that resolved config, the world
as one node, fp32, no checkpointing, masked attention (packed rows), with ``cpu_resident``'s
correction for buffers that are allocated but never written.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common

TOLERANCE = 0.10
RANKS = 2
SETTINGS = dict(micro_batch=2, seq=128)
LAYOUT_CONFIGS = {0: {"zero_optimization": {"stage": 0}}, 2: str(common.DEEPSPEED[2]),
                  3: str(common.DEEPSPEED[3])}


def run_config(stage: int, model_dir: str, out_dir: str, cache_dir: str, steps: int):
    """The run config every layout trains with: only ``deepspeed`` differs."""
    from propulsion_ds.config.load import config_from_dict
    raw = {"model": {"name_or_path": model_dir, "dtype": "fp32", "gradient_checkpointing": False},
           "data": {"train": str(common.SHAKESPEARE), "format": "text", "max_length": SETTINGS["seq"],
                    "packing": True, "eval_fraction": 0.0, "cache_dir": cache_dir},
           "train": {"micro_batch_size": SETTINGS["micro_batch"], "max_steps": steps, "lr": 1e-3},
           "checkpoint": {"every_steps": 10_000}, "output_dir": out_dir,
           "deepspeed": LAYOUT_CONFIGS[stage]}
    return config_from_dict(raw)


def cpu_resident(zero, trained: int):
    """The ZeRO settings whose buffers are resident on CPU. ``torch.empty`` pages that are never
    written are not in RSS: a reduce bucket holds at most the trained elements it is written with."""
    import dataclasses
    return dataclasses.replace(zero, reduce_bucket_size=min(zero.reduce_bucket_size, trained))


def estimate(shape, ds_config: dict, world: int, method: str, seq: int, batch: int, dtype_bytes: int,
             masked: bool = True):
    """The planner's per-GPU plan for the measured run (packed rows: masked attention)."""
    from propulsion_ds.tools.memory import Cluster, ZeroSettings, method_plan, trained_count
    zero = cpu_resident(ZeroSettings.from_deepspeed(ds_config), trained_count(method, shape))
    return method_plan(method, shape, zero, Cluster(1, world), seq=seq, batch=batch,
                       checkpointing=False, dtype_bytes=dtype_bytes, masked=masked)


# ------------------------------------------------------------------------------------ worker
def warm_up() -> None:
    """Import what the trainer will import and run the kernels it will run, on a tiny LLaMA, so
    library code and its first-use pages are in the baseline and not counted as training memory."""
    import torch
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM
    from propulsion_ds.method.propulsion import PropulsionConfig, inject, trainable_parameters
    from propulsion_ds.train.loss import token_loss_sum
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).requires_grad_(False)
    inject(model, PropulsionConfig())
    opt = torch.optim.AdamW(trainable_parameters(model))
    ids = torch.randint(0, 256, (2, 32))
    pos = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, 32)
    for kw in ({}, {"position_ids": pos}):
        token_loss_sum(model(input_ids=ids, use_cache=False, **kw).logits, ids).backward()
        opt.step()
    del model, opt
    gc.collect()


def worker(stage: int, model_dir: str, out: Path, cache_dir: str, run_dir: str, steps: int) -> None:
    """One rank of one layout: the trainer's own set-up and steps, peak RSS over the steps."""
    import torch
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM
    from propulsion_ds.train.recipe import Trainer
    common.quiet()
    torch.set_num_threads(1)
    warm_up()
    base, peaks = {}, []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def measured_load(cls, *a, **k):    # the baseline: all the trainer holds before the model
        gc.collect()
        base["rss"] = common.current_rss_bytes()
        return load(cls, *a, **k)

    AutoModelForCausalLM.from_pretrained = classmethod(measured_load)
    trainer = Trainer(run_config(stage, model_dir, run_dir, cache_dir, steps), overwrite=True)
    trainer.setup()
    engine_step = trainer.engine.step

    def measured_step(*a, **k):         # VmHWM after each optimizer step: the final save is left out
        result = engine_step(*a, **k)
        peaks.append(common.hwm_rss_bytes())
        return result

    trainer.engine.step = measured_step
    gc.collect()
    built = common.current_rss_bytes()
    common.reset_peak_rss()
    trainer.train()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    vals = torch.zeros(3 * world, dtype=torch.float64)
    vals[3 * rank:3 * rank + 3] = torch.tensor([base["rss"], built, peaks[-1]], dtype=torch.float64)
    tdist.all_reduce(vals)
    if rank == 0:
        v = vals.tolist()
        common.write_json(out, {"stage": stage, "ds_config": trainer.ds_config, "steps": steps,
                                "base_per_rank": v[0::3], "built_per_rank": v[1::3],
                                "train_peak_per_rank": v[2::3]})
    tdist.barrier()
    trainer.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stage: int, model_dir: str, out: Path, cache_dir: str, steps: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"memory_check_zero{stage}_")
    out.unlink(missing_ok=True)                 # never report a previous run's numbers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(RANKS),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "bench.memory_check",
           "--worker", str(stage), "--model-dir", model_dir, "--out", str(out), "--cache-dir", cache_dir,
           "--run-dir", run_dir, "--steps", str(steps)]
    # glibc: every block of 64 KiB or more gets its own mmap and goes back to the OS on free.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(cmd, env=env, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"ZeRO-{stage} run failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------ report
def as_result(raw: dict, machine: dict) -> dict:
    """One layout's measurement in the form ``compare`` reads (one row: Propulsion)."""
    over = [p - b for p, b in zip(raw["train_peak_per_rank"], raw["base_per_rank"])]
    return {"settings": {"seq": SETTINGS["seq"], "micro_batch": SETTINGS["micro_batch"]}, "dtype": "fp32",
            "ds_config": raw["ds_config"], "machine": machine, "steps": raw["steps"],
            "rows": {"propulsion": {"train_over_base": max(over), "over_base_per_rank": over,
                                    "base_all_ranks": raw["base_per_rank"],
                                    "train_peak_per_rank": max(raw["train_peak_per_rank"])}}}


def compare(results: dict, shape) -> list:
    """One dict per (layout, measured row): the planner's parts, the measurement, the ratio."""
    out = []
    for stage, res in sorted(results.items()):
        st = res["settings"]
        db = 4 if res.get("dtype", "fp32") == "fp32" else 2
        for name, r in res["rows"].items():
            plan = estimate(shape, res["ds_config"], res["machine"]["ranks"], name, st["seq"],
                            st["micro_batch"], db)
            measured = r["train_over_base"]
            out.append({"stage": stage, "row": name, "model_states": plan.model_states_gpu,
                        "activations": plan.activations, "logits": plan.logits, "buffers": plan.buffers,
                        "estimate": plan.total_gpu, "measured": measured,
                        "measured_per_rank": r.get("over_base_per_rank", [measured]),
                        "base": max(r["base_all_ranks"]), "train_peak": r["train_peak_per_rank"],
                        "ratio": measured / plan.total_gpu,
                        "within": abs(measured / plan.total_gpu - 1) <= TOLERANCE})
    return out


def table(rows: list) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"        # noqa: E731
    lines = [[f"ZeRO-{r['stage']}", r["row"], mib(r["model_states"]), mib(r["activations"]), mib(r["logits"]),
              mib(r["buffers"]), mib(r["estimate"]), " / ".join(mib(m) for m in r["measured_per_rank"]),
              mib(r["base"]), f"{r['ratio']:.3f}", "yes" if r["within"] else "NO"] for r in rows]
    return common.markdown_table(
        ["layout", "row", "model states", "activations", "logits+loss", "ZeRO buffers", "estimate",
         "measured peak − baseline, per rank", "baseline RSS", "measured (max rank) / estimate",
         f"within {TOLERANCE:.0%}"], lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", type=int, nargs="+", default=[0, 2, 3], choices=sorted(LAYOUT_CONFIGS))
    ap.add_argument("--steps", type=int, default=4, help="training steps per layout (the first allocates Adam)")
    ap.add_argument("--results", default=str(common.RESULTS))
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker is not None:
        worker(args.worker, args.model_dir, Path(args.out), args.cache_dir, args.run_dir, args.steps)
        return 0
    common.quiet()
    from propulsion_ds.tools.memory import model_shape
    model_dir = str(common.model_path("smollm2"))
    results_dir = Path(args.results)
    cache_dir = str(Path(tempfile.gettempdir()) / "propulsion-memory-check-data")
    m = common.machine("cpu", RANKS, "gloo")
    results = {}
    for stage in args.layouts:                  # one at a time: the machine is shared
        raw = measure(stage, model_dir, Path(cache_dir) / f"zero{stage}.json", cache_dir, args.steps)
        results[stage] = as_result(raw, m)
    m["load_avg_1_5_15_after"] = common.machine("cpu", RANKS, "gloo").get("load_avg_1_5_15")
    rows = compare(results, model_shape(Path(model_dir) / "config.json"))
    print(f"### planner vs measured, SmolLM2-135M-Instruct, Propulsion, {RANKS} CPU ranks, fp32, "
          f"micro-batch {SETTINGS['micro_batch']} x {SETTINGS['seq']} tokens, MiB per rank\n")
    print(f"{m['date']}, {m['platform']}, {m['cpu_cores']} cores, load average (1/5/15 min) "
          f"{m['load_avg_1_5_15']} before, {m['load_avg_1_5_15_after']} after. Measured peak = the "
          f"kernel's RSS high-water mark (VmHWM) over {args.steps} training steps minus the RSS right "
          f"before the model build (after imports and a kernel warm-up); the estimate is the planner's "
          f"per-GPU total for the same resolved DeepSpeed config.\n")
    print(table(rows))
    common.write_json(results_dir / "memory_check_smollm2.json", {"rows": rows, "machine": m,
                                                                  "settings": SETTINGS, "steps": args.steps})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
