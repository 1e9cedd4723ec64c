"""The whole plan of one run config: its model's shape, its DeepSpeed config, every method."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from propulsion_ds.errors import PlanError
from propulsion_ds.tools.memory.estimate import MethodPlan, method_plan
from propulsion_ds.tools.memory.layout import LayoutAdvice, recommend_layout, usable_bytes
from propulsion_ds.tools.memory.shape import REPO_ROOT, ModelShape, model_shape, resolve_model_config
from propulsion_ds.tools.memory.zero import Cluster, ZeroSettings


@dataclass
class Plan:
    run_config: str
    shape: ModelShape
    zero: ZeroSettings
    cluster: Cluster
    seq: int
    batch: int
    dtype: str
    checkpointing: bool
    degree: int
    targets: str
    deepspeed_source: str
    methods: dict               # method -> MethodPlan
    gpu_memory_gib: float = 80.0
    advice: LayoutAdvice | None = None

    @property
    def propulsion(self) -> MethodPlan:
        return self.methods["propulsion"]

    @property
    def usable_gpu_bytes(self) -> int:
        return usable_bytes(self.gpu_memory_gib)

    def fits(self, method: str = "propulsion") -> bool:
        return self.methods[method].total_gpu <= self.usable_gpu_bytes


def _resolve_ds_path(value):
    if isinstance(value, dict) or os.path.isabs(value) or os.path.exists(value):
        return value
    alt = REPO_ROOT / value
    return str(alt) if alt.exists() else value


def plan_from_run_config(path, *, nodes: int, gpus_per_node: int, model_config: str | None = None,
                         overrides=(), gpu_memory_gib: float = 80.0) -> Plan:
    """Plan the run config at ``path`` (files on disk are not checked: the model path may be a
    placeholder) on ``nodes`` x ``gpus_per_node`` GPUs. Raises PlanError or ConfigError."""
    from propulsion_ds.config.load import load_config
    from propulsion_ds.config.deepspeed import resolve_deepspeed

    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"nodes and gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if not gpu_memory_gib > 0:
        raise PlanError(f"GPU memory must be > 0 GiB, got {gpu_memory_gib}")
    cfg = load_config(path, overrides, check_files=False)
    shape = model_shape(resolve_model_config(cfg.model.name_or_path, model_config), cfg.propulsion)
    ds_src = cfg.deepspeed
    cfg = dataclasses.replace(cfg, deepspeed=_resolve_ds_path(cfg.deepspeed))
    # resolved as the trainer resolves it: "auto" buckets from the model's width
    zero = ZeroSettings.from_deepspeed(resolve_deepspeed(cfg, nodes * gpus_per_node, shape.hidden_size))
    cluster = Cluster(nodes, gpus_per_node)
    # Packed rows reach the attention as a document mask (estimate.py's "masked attention").
    kw = dict(seq=cfg.data.max_length, batch=cfg.train.micro_batch_size,
              checkpointing=cfg.model.gradient_checkpointing,
              dtype_bytes=4 if cfg.model.dtype == "fp32" else 2, masked=cfg.data.packing)
    methods = {m: method_plan(m, shape, zero, cluster, **kw) for m in ("propulsion", "lora", "full")}
    targets = cfg.propulsion.targets if isinstance(cfg.propulsion.targets, str) \
        else ",".join(cfg.propulsion.targets)
    return Plan(run_config=str(path), shape=shape, zero=zero, cluster=cluster,
                seq=cfg.data.max_length, batch=cfg.train.micro_batch_size, dtype=cfg.model.dtype,
                checkpointing=cfg.model.gradient_checkpointing, degree=cfg.propulsion.degree,
                targets=targets, deepspeed_source=ds_src if isinstance(ds_src, str) else "inline",
                methods=methods, gpu_memory_gib=gpu_memory_gib,
                advice=recommend_layout(shape, cluster, gpu_memory_gib=gpu_memory_gib, **kw))
