"""Layout advice: which shipped DeepSpeed layout to train with on a given model and cluster.

Replicate the frozen base (ZeRO-2: only the vectors' gradients and optimizer state sharded) when
the whole replicated run needs at most ``1 - REPLICATE_HEADROOM`` of a GPU's usable memory: a
replicated base has no per-module gather/release and no per-step re-partitioning, which is where
ZeRO-3's engine floor goes (bench/speed.py). Otherwise ZeRO-3, with ZeRO++ hpZ across nodes
(zero_hpz_partition_size = GPUs per node) when the secondary copy fits; then ZeRO-3 alone; then
ZeRO-3 with CPU offload.
"""
from __future__ import annotations

from dataclasses import dataclass

from propulsion_ds.errors import PlanError
from propulsion_ds.tools.memory.estimate import method_plan
from propulsion_ds.tools.memory.shape import ModelShape
from propulsion_ds.tools.memory.zero import Cluster, ZeroSettings

GIB = 2 ** 30
GPU_RESERVE_FRACTION = 0.10           # CUDA context, NCCL buffers, fragmentation
REPLICATE_HEADROOM = 0.20             # replicate only with 20% of usable memory to spare: packed
                                      # rows, longer eval batches and fragmentation vary per run
DEEPSPEED_CONFIGS = {                 # layout -> shipped DeepSpeed config (relative to the repo)
    "replicated": "configs/deepspeed/zero2.json",
    "zero3": "configs/deepspeed/zero3.json",
    "zero3_hpz": "configs/deepspeed/zero3_hpz.json",
    "zero3_offload": "configs/deepspeed/zero3_offload.json",
}
LAYOUTS = ("replicated", "zero3_hpz", "zero3", "zero3_offload")


def usable_bytes(gpu_memory_gib: float) -> int:
    return int(gpu_memory_gib * GIB * (1 - GPU_RESERVE_FRACTION))


def layout_zero(layout: str, cluster: Cluster, hidden: int) -> ZeroSettings:
    """The ZeRO settings of a shipped layout, "auto" buckets filled from ``hidden`` as the engine does."""
    buckets = dict(reduce_bucket_size=hidden * hidden, prefetch_bucket_size=int(0.9 * hidden * hidden),
                   persistence_threshold=10 * hidden)
    if layout == "replicated":            # the stage-3 settings do not apply: defaults
        return ZeroSettings(stage=2, overlap_comm=True, reduce_bucket_size=hidden * hidden)
    if layout == "zero3":
        return ZeroSettings(stage=3, overlap_comm=True, **buckets)
    if layout == "zero3_hpz":
        return ZeroSettings(stage=3, overlap_comm=True, hpz_partition_size=cluster.gpus_per_node, **buckets)
    if layout == "zero3_offload":
        return ZeroSettings(stage=3, overlap_comm=True, offload_param=True, offload_optimizer=True, **buckets)
    raise PlanError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


@dataclass
class LayoutAdvice:
    layout: str                 # one of LAYOUTS, or "none" when nothing fits
    deepspeed: str | None       # the shipped DeepSpeed config for it
    overrides: list             # the --set arguments that select it
    need_bytes: dict            # layout -> total bytes per GPU (every layout considered)
    usable_bytes: int           # per GPU, after GPU_RESERVE_FRACTION
    reason: str

    @property
    def set_args(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _choose(need: dict, usable: int, cluster: Cluster) -> tuple[str, str]:
    """(layout, reason) from each layout's total per GPU (rules in the module docstring)."""
    limit = int(usable * (1 - REPLICATE_HEADROOM))
    if need["replicated"] <= limit:
        return "replicated", (f"the replicated frozen base fits: {_gib(need['replicated'])} per GPU of "
                              f"{_gib(usable)} usable (at most {1 - REPLICATE_HEADROOM:.0%} = {_gib(limit)}); "
                              f"ZeRO-2 shards only the trained vectors' gradients and optimizer state")
    why = (f"a replicated base needs {_gib(need['replicated'])} per GPU, more than "
           f"{1 - REPLICATE_HEADROOM:.0%} of {_gib(usable)} usable")
    layout = next((l for l in ("zero3_hpz", "zero3", "zero3_offload") if l in need and need[l] <= usable), "none")
    if layout == "zero3_hpz":
        return layout, (f"{why}; ZeRO-3 with ZeRO++ hpZ over each node's {cluster.gpus_per_node} GPUs "
                        f"({_gib(need[layout])} per GPU) keeps the parameter all-gathers inside a node")
    if layout == "zero3":
        extra = f"; hpZ's secondary copy does not fit ({_gib(need['zero3_hpz'])})" if "zero3_hpz" in need else ""
        return layout, f"{why}; ZeRO-3 partitions the base over all {cluster.gpus} GPUs ({_gib(need[layout])}){extra}"
    if layout == "zero3_offload":
        alone = (f"ZeRO-3 on GPUs alone needs {_gib(need['zero3'])}" if "zero3" in need
                 else "one GPU has nothing to partition over")
        return layout, (f"{why}; {alone}: offload parameters and optimizer state to CPU "
                        f"({_gib(need[layout])} per GPU)")
    return layout, (f"{why}; even ZeRO-3 with CPU offload needs {_gib(need['zero3_offload'])} per GPU: "
                    f"use more or larger GPUs, a shorter data.max_length or micro-batch, or "
                    f"gradient checkpointing")


def recommend_layout(shape: ModelShape, cluster: Cluster, *, seq: int, batch: int, checkpointing: bool,
                     dtype_bytes: int = 2, gpu_memory_gib: float = 80.0,
                     method: str = "propulsion", masked: bool = False) -> LayoutAdvice:
    """Which layout to train ``method`` with on ``cluster`` (rules in the module docstring).

    Replicating the frozen base removes ZeRO-3's per-module gather/release and per-step
    re-partitioning; it is taken only with REPLICATE_HEADROOM of the usable memory to spare.
    ZeRO++ hpZ needs more than one node (on one node its secondary group is the whole world);
    plain ZeRO-3 needs more than one GPU.
    """
    usable = usable_bytes(gpu_memory_gib)
    kw = dict(seq=seq, batch=batch, checkpointing=checkpointing, dtype_bytes=dtype_bytes, masked=masked)
    need = {}
    for layout in LAYOUTS:
        if layout == "zero3_hpz" and cluster.nodes == 1:
            continue                    # one node: the secondary group would be the whole world
        if layout == "zero3" and cluster.gpus == 1:
            continue                    # nothing to partition over: only offload saves memory
        z = layout_zero(layout, cluster, shape.hidden_size)
        need[layout] = method_plan(method, shape, z, cluster, **kw).total_gpu
    layout, reason = _choose(need, usable, cluster)
    ds = DEEPSPEED_CONFIGS.get(layout)
    overrides = [] if ds is None else [f"deepspeed={ds}"]
    if layout == "zero3_hpz":
        overrides.append(f"deepspeed.zero_optimization.zero_hpz_partition_size={cluster.gpus_per_node}")
    return LayoutAdvice(layout=layout, deepspeed=ds, overrides=overrides, need_bytes=need,
                        usable_bytes=usable, reason=reason)
