"""Estimate per-GPU and per-node memory of a Propulsion run before loading any weight.

    python launch/estimate_memory.py --config configs/llama70b.json --nodes 4 --gpus-per-node 8
    python launch/estimate_memory.py --config configs/llama13b.json --nodes 1 --gpus-per-node 8
    python launch/estimate_memory.py --config my.json --model-config /models/llama-2-13b-hf/config.json

The model's shape comes from its config.json: --model-config if given, else
<model.name_or_path>/config.json, else (for the shipped configs, whose model path is a placeholder
such as /path/to/llama-2-70b-hf) the matching configs/models/<name>/config.json. The model is built
on PyTorch's meta device: nothing is downloaded and no weight is allocated. Formulas and their
sources: the propulsion_ds/tools/memory/ package. It ends with the layout advice: the replicated frozen base
(ZeRO-2, configs/deepspeed/zero2.json) when it fits a GPU with 20% of its usable memory to spare,
else ZeRO-3 with ZeRO++ hierarchical partitioning across nodes (configs/deepspeed/zero3_hpz.json,
zero_hpz_partition_size = GPUs per node), else ZeRO-3, else ZeRO-3 with CPU offload, and prints the
``--set deepspeed=...`` arguments that select it for launch/train.py.
Exit codes: 0 printed; 2 bad arguments or config.
"""
from __future__ import annotations

import argparse
import os
import sys


from launch.common import fail, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config JSON (see configs/)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--model-config", default=None,
                   help="the model's config.json (default: <model.name_or_path>/config.json, "
                        "else the matching configs/models/*/config.json)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (repeatable), e.g. --set train.micro_batch_size=2")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    if not args.gpu_memory_gib > 0:
        p.error("--gpu-memory-gib must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")       # DeepSpeed's estimator needs no GPU
    from propulsion_ds.config import ConfigError
    from propulsion_ds.tools.memory import PlanError, format_plan, plan_from_run_config

    try:
        plan = plan_from_run_config(args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                    model_config=args.model_config, overrides=args.overrides,
                                    gpu_memory_gib=args.gpu_memory_gib)
    except (ConfigError, PlanError) as e:
        fail(str(e))
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
