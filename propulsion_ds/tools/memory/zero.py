"""ZeRO settings as the planner costs them, and what ZeRO-3 keeps gathered at its peak.

ZeRO-3 working memory (from the DeepSpeed config, "auto" filled as the engine does: h*h, 0.9*h*h,
10*h), read off DeepSpeed 0.19's ``PartitionedParameterCoordinator``:
  * Retention. After a module runs, a parameter is released unless it is used again within
    ``stage3_max_reuse_distance`` elements of the recorded trace (forward and backward of one step).
    A frozen base is used in the forward and again in the backward, so a layer whose backward comes
    within that distance stays gathered: the last max_reuse_distance/2 elements of the forward,
    or the whole model when that covers it (the shipped configs: 1e9, more than twice a 135M
    model). Everything is released by the optimizer step. ``stage3_max_live_parameters`` caps only
    the prefetcher, not retention.
  * Prefetch. ``stage3_prefetch_bucket_size`` elements fetched ahead of use, into the parameters'
    own storage: gathered parameters like the others, not a separate bucket.
  * Persistent parameters (numel <= stage3_param_persistence_threshold) stay whole on every GPU.
  * The reduce (IPG) bucket, reduce_bucket_size elements (contiguous_gradients).
So the parameters gathered at the forward/backward turn are min(P, reuse/2 + the module running
+ prefetch + persistent): each counted once. The first step (no trace yet) releases after use.
ZeRO++ hierarchical partitioning (zero_hpz_partition_size = g > 1) keeps a second copy of the
parameters partitioned over g GPUs (a node) so the forward/backward all-gathers stay inside the
node: +P*bytes/g per GPU. ZeRO-1/2: the reduce (IPG) bucket, doubled with overlap_comm.
"""
from __future__ import annotations

from dataclasses import dataclass

from propulsion_ds.errors import PlanError
from propulsion_ds.tools.memory.shape import ModelShape


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class ZeroSettings:
    stage: int = 3
    offload_param: bool = False
    offload_optimizer: bool = False
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    allgather_bucket_size: int = 500_000_000
    hpz_partition_size: int = 1         # ZeRO++ hpZ: secondary partition group size (GPUs per node)
    overlap_comm: bool = False          # ZeRO-1/2 then allocate a second reduce bucket

    @classmethod
    def from_deepspeed(cls, ds: dict) -> "ZeroSettings":
        """From a DeepSpeed config dict whose "auto" values are already filled."""
        z = ds.get("zero_optimization") or {}

        def on(key):
            off = z.get(key) or {}
            return isinstance(off, dict) and off.get("device", "none") not in ("none", None)

        def num(key, default):
            v = z.get(key, default)
            if isinstance(v, str):
                raise PlanError(f"deepspeed.zero_optimization.{key} is {v!r}; fill it before planning")
            return int(v)

        d = cls()
        return cls(stage=int(z.get("stage", 0)), offload_param=on("offload_param"),
                   offload_optimizer=on("offload_optimizer"),
                   reduce_bucket_size=num("reduce_bucket_size", d.reduce_bucket_size),
                   prefetch_bucket_size=num("stage3_prefetch_bucket_size", d.prefetch_bucket_size),
                   persistence_threshold=num("stage3_param_persistence_threshold", d.persistence_threshold),
                   max_live_parameters=num("stage3_max_live_parameters", d.max_live_parameters),
                   max_reuse_distance=num("stage3_max_reuse_distance", d.max_reuse_distance),
                   allgather_bucket_size=num("allgather_bucket_size", d.allgather_bucket_size),
                   hpz_partition_size=num("zero_hpz_partition_size", 1),
                   overlap_comm=bool(z.get("overlap_comm", False)))

    def describe(self) -> str:
        s = f"ZeRO stage {self.stage}"
        if self.stage >= 3 and self.hpz_partition_size > 1:
            s += f", ZeRO++ hpZ over {self.hpz_partition_size} GPUs"
        if self.stage >= 1:
            s += (f", offload_param={'cpu' if self.offload_param else 'none'}"
                  f", offload_optimizer={'cpu' if self.offload_optimizer else 'none'}")
        return s


def zero3_live_params(shape: ModelShape, zero: ZeroSettings) -> int:
    """Parameters ZeRO-3 holds gathered at the forward/backward turn (module docstring)."""
    running = max(shape.largest_module_params, shape.decoder_layer_params)
    ahead = zero.max_reuse_distance // 2 + running + zero.prefetch_bucket_size
    return min(shape.total_params, ahead + shape.persistent_params(zero.persistence_threshold))
