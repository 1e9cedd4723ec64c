"""The memory planner's estimate against the measured peak of bench/speed.py's memory runs.

    python bench/speed.py --model smollm2 --zero 3 2 --memory-rows propulsion lora full
    python bench/memory_check.py                      # reads bench/results/speed_smollm2_zero{2,3}.json

What is compared, per rank: the planner's per-GPU total (model states + activations + logits +
ZeRO buffers, propulsion_ds.tools.memory.method_plan on the run's own DeepSpeed config, its world size
as one node, fp32, no checkpointing) against the measured peak RSS of the training steps minus the
same process's RSS right before the model was built. That baseline (measured, not assumed) holds
the Python interpreter, the torch/transformers/deepspeed libraries, the gloo process group and the
tokenized data; the planner does not model it (on a GPU it is host memory, not device memory).
The training-steps peak is the kernel's VmHWM after resetting it once the row is built (so the
load-time peak of reading the checkpoint is left out, as the planner's per-GPU figure leaves it
out; the planner reports it as host memory). glibc returns every freed block of 64 KiB or more
(MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors. ``torch.empty`` buffers that are never
written (most of a ZeRO reduce bucket on CPU) are not resident and so are not in the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

TOLERANCE = 0.10


def estimate(shape, ds_config: dict, world: int, method: str, seq: int, batch: int, dtype_bytes: int):
    import dataclasses
    from propulsion_ds.tools.memory import Cluster, ZeroSettings, method_plan
    zero = ZeroSettings.from_deepspeed(ds_config)
    # On CPU a reduce bucket is resident only where gradients are written into it (torch.empty
    # pages are not touched otherwise): at most the trained elements, not the bucket size.
    trained = {"propulsion": shape.propulsion_trainable, "lora": shape.lora_trainable,
               "full": shape.total_params}[method]
    zero = dataclasses.replace(zero, reduce_bucket_size=min(zero.reduce_bucket_size, trained))
    return method_plan(method, shape, zero, Cluster(1, world), seq=seq, batch=batch,
                       checkpointing=False, dtype_bytes=dtype_bytes)


def compare(results: dict, shape) -> list:
    """One dict per (stage, measured row): the planner's parts, the measurement, the ratio."""
    out = []
    for stage, res in sorted(results.items()):
        st = res["settings"]
        db = 4 if res.get("dtype", "fp32") == "fp32" else 2
        for name, r in res["rows"].items():
            if "train_over_base" not in r or name not in ("propulsion", "lora", "full"):
                continue
            plan = estimate(shape, res["ds_config"], res["machine"]["ranks"], name, st["seq"],
                            st["micro_batch"], db)
            measured = r["train_over_base"]
            out.append({"stage": stage, "row": name, "model_states": plan.model_states_gpu,
                        "activations": plan.activations, "logits": plan.logits, "buffers": plan.buffers,
                        "estimate": plan.total_gpu, "measured": measured,
                        "base": max(r["base_all_ranks"]), "train_peak": r["train_peak_per_rank"],
                        "ratio": measured / plan.total_gpu,
                        "within": abs(measured / plan.total_gpu - 1) <= TOLERANCE})
    return out


def table(rows: list) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"        # noqa: E731
    lines = [[f"ZeRO-{r['stage']}", r["row"], mib(r["model_states"]), mib(r["activations"]), mib(r["logits"]),
              mib(r["buffers"]), mib(r["estimate"]), mib(r["train_peak"]), mib(r["base"]), mib(r["measured"]),
              f"{r['ratio']:.3f}", "yes" if r["within"] else "NO"] for r in rows]
    return common.markdown_table(
        ["layout", "row", "model states", "activations", "logits+loss", "ZeRO buffers", "planner total",
         "measured peak RSS (steps)", "process baseline", "measured − baseline", "measured / planner",
         f"within {TOLERANCE:.0%}"], lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--results", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    common.quiet()
    from propulsion_ds.tools.memory import model_shape
    results = {}
    for stage in (2, 3):
        p = Path(args.results) / f"speed_{args.model}_zero{stage}.json"
        if p.is_file():
            results[stage] = json.loads(p.read_text())
    if not results:
        raise SystemExit(f"no {args.results}/speed_{args.model}_zero{{2,3}}.json: run bench/speed.py first")
    shape = model_shape(common.model_path(args.model) / "config.json")
    rows = compare(results, shape)
    m = next(iter(results.values()))["machine"]
    print(f"### planner vs measured, {args.model}, {m['ranks']} CPU ranks, fp32, per rank, MiB "
          f"({m['date']}, {common.load_note(m['load_avg_1m'], m['cpu_cores'])})\n")
    print(table(rows))
    common.write_json(Path(args.results) / f"memory_check_{args.model}.json", {"rows": rows, "machine": m})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
