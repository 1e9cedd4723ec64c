"""Memory planner: what a Propulsion run needs per GPU and per node, before any weight is loaded.

The model is built on the ``meta`` device from its ``config.json`` (no weights, a few seconds even
for 70B), Propulsion is injected with the run config's section, and every count below is read off
that model: total parameters, the largest single module (DeepSpeed's "largest layer"), one decoder
layer, the trainable Propulsion channels, and what LoRA r=8 on the same linears would train.

Byte accounting (mixed precision, bf16/fp16; fp32 runs use 4-byte params and 8-byte Adam state):
  parameters            2 B/param   bf16 copy; ZeRO-3 partitions it over all GPUs (or offloads it)
  gradients             4 B/trained the fp32 gradient partition the optimizer steps on (ZeRO-3
                                    accumulates in the model dtype and upcasts each sub-group for
                                    the step; counted at 4 B as DeepSpeed's own estimator does)
  optimizer             12 B/trained fp32 master copy + Adam m + Adam v
  largest layer         4 B x largest module for full fine-tuning (its gathered bf16 params and
                        their bf16 gradient), 2 B for frozen-base methods (a frozen module gets
                        no weight gradient): DeepSpeed's ``largest_layer_memory``.
So full fine-tuning under ZeRO-3 costs 18 B/param partitioned + 4 B x largest module, which is
exactly ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` (the function behind
``estimate_zero3_model_states_mem_needs_all_cold``) for every offload setting, zero_init=True; its
CPU figure includes DeepSpeed's ``additional_buffer_factor`` 1.5 (pinned staging buffers and
allocator slack), which the planner applies to host memory too. DeepSpeed's estimator knows only
full fine-tuning; Propulsion and LoRA use the same accounting with "trained" = their own counts.

Activations: bytes that autograd saves for backward, per token and decoder layer, counted on
LLaMA layers (transformers 5.24, SDPA attention, torch 2.13) with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters excluded) while varying
the hidden size h, the K/V width d_kv = kv_heads*head_dim, the MLP width I and the heads a one at
a time; linear in each and in the sequence length (no s^2 term: SDPA keeps only the log-sum-exp
per head). ``tests/test_memory.py`` re-counts them on the real stories260K and SmolLM2 shapes.
  method       fp32                                 bf16
  propulsion   28h + 12 d_kv + 12 I + 4(a+2)        18h + 8 d_kv + 10 I + 4(a+2)
  LoRA r       24h +  8 d_kv + 16 I + 4(a+2) + 28r  16h + 4 d_kv +  8 I + 4(a+2) + 14r
  full         32h +  8 d_kv + 16 I + 4(a+2)        20h + 4 d_kv +  8 I + 4(a+2)
(bf16 runs keep the RMSNorms' fp32 upcasts and Propulsion's fp32 scale; a frozen base saves no
linear inputs, but Propulsion's scale gradient needs each target's output y'.) With (full)
activation checkpointing each layer keeps only its input (h per token, model dtype) and one layer
is recomputed with all of the above. Eager attention also stores the s x s attention matrix per
head, which this table does not count.
Logits and loss, bytes per token per vocabulary entry: the logits the caller holds (model dtype)
+ log-softmax's saved fp32 output + two fp32 gradients alive during its backward = dtype + 12.
s = data.max_length, b = train.micro_batch_size, V = vocabulary.

ZeRO-3 working buffers (from the DeepSpeed config, "auto" filled as the engine does: h*h,
0.9*h*h, 10*h): the prefetch bucket (stage3_prefetch_bucket_size 16-bit elements), the reduce
(IPG) bucket (reduce_bucket_size elements, allocated with contiguous_gradients), the rest of a
decoder layer that stays gathered between recompute and backward beyond the largest module
(capped by stage3_max_live_parameters), and the small "persistent" parameters (numel <=
stage3_param_persistence_threshold) that every GPU keeps whole. ZeRO++ hierarchical partitioning
(zero_hpz_partition_size = g > 1) keeps a second copy of the parameters partitioned over g GPUs
(a node) so the forward/backward all-gathers stay inside the node: +P*bytes/g per GPU.
ZeRO-1/2: the reduce (IPG) bucket, doubled with overlap_comm (DeepSpeed allocates two).

Layout advice (``recommend_layout``): replicate the frozen base (ZeRO-2: only the vectors'
gradients and optimizer state sharded) when the whole replicated run needs at most
``1 - REPLICATE_HEADROOM`` of a GPU's usable memory: a replicated base has no per-module
gather/release and no per-step re-partitioning, which is where ZeRO-3's engine floor goes
(bench/speed.py). Otherwise ZeRO-3, with ZeRO++ hpZ across nodes (zero_hpz_partition_size =
GPUs per node) when the secondary copy fits; then ZeRO-3 alone; then ZeRO-3 with CPU offload.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from propulsion_ds.errors import PlanError  # noqa: F401

GIB = 2 ** 30
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL_CONFIGS = REPO_ROOT / "configs" / "models"
DS_ADDITIONAL_BUFFER_FACTOR = 1.5     # DeepSpeed's estimator: host pinned buffers, allocator slack
GPU_RESERVE_FRACTION = 0.10           # CUDA context, NCCL buffers, fragmentation
REPLICATE_HEADROOM = 0.20             # replicate only with 20% of usable memory to spare: packed
                                      # rows, longer eval batches and fragmentation vary per run
LORA_RANK = 8
DEEPSPEED_CONFIGS = {                 # layout -> shipped DeepSpeed config (relative to the repo)
    "replicated": "configs/deepspeed/zero2.json",
    "zero3": "configs/deepspeed/zero3.json",
    "zero3_hpz": "configs/deepspeed/zero3_hpz.json",
    "zero3_offload": "configs/deepspeed/zero3_offload.json",
}



# --------------------------------------------------------------------------- model shape
@dataclass
class ModelShape:
    source: str                 # the config.json the shape was read from
    architecture: str
    total_params: int
    largest_module: str
    largest_module_params: int
    decoder_layer_params: int   # the largest decoder layer (all its modules)
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    propulsion_trainable: int
    lora_trainable: int
    intermediate_size: int = 0  # MLP width I (0: 4h)
    kv_dim: int = 0             # K/V projection width kv_heads * head_dim (0: h)
    small_param_numels: list = field(default_factory=list, repr=False)   # for persistence

    def persistent_params(self, threshold: int) -> int:
        return sum(n for n in self.small_param_numels if n <= threshold)


def _normalise(name: str) -> str:
    name = name.lower().rstrip("/")
    name = re.sub(r"[-_]hf$", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


def resolve_model_config(name_or_path: str, explicit: str | None = None) -> Path:
    """The config.json to plan with.

    ``explicit`` (a config.json or a directory holding one) wins. Else ``<name_or_path>/config.json``.
    Else, for a placeholder path such as ``/path/to/llama-2-70b-hf`` or a hub id such as
    ``meta-llama/Llama-2-70b-hf``, the shipped ``configs/models/<name>/config.json`` whose name
    matches the path's last component ignoring case, punctuation and a trailing ``-hf``.
    """
    def as_file(p: Path) -> Path:
        return p / "config.json" if p.is_dir() else p

    if explicit:
        p = as_file(Path(explicit))
        if not p.is_file():
            raise PlanError(f"model config not found: {explicit!r} (a config.json or its directory)")
        return p
    p = Path(name_or_path) / "config.json"
    if p.is_file():
        return p
    want = _normalise(Path(name_or_path).name)
    if SHIPPED_MODEL_CONFIGS.is_dir():
        for d in sorted(SHIPPED_MODEL_CONFIGS.iterdir()):
            if _normalise(d.name) == want and (d / "config.json").is_file():
                return d / "config.json"
    raise PlanError(f"no config.json at {str(p)!r} and no shipped configs/models/* matches "
                    f"{Path(name_or_path).name!r}: pass --model-config PATH/config.json")


def model_shape(config_path, propulsion_config=None, lora_rank: int = LORA_RANK) -> ModelShape:
    """Counts read off the model built on the meta device (no weights are allocated)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from propulsion_ds.method.propulsion import PropulsionConfig, get_state, inject
    from propulsion_ds.method.targets import decoder_layers, find_targets

    config_path = Path(config_path)
    try:
        cfg = AutoConfig.from_pretrained(str(config_path.parent))
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read model config {str(config_path)!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)

    params = list(model.parameters())                 # shared (tied) tensors listed once
    total = sum(p.numel() for p in params)
    largest_name, largest = "", 0
    for name, m in model.named_modules():             # DeepSpeed's model_to_params definition
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest_name, largest = name, n
    _, layers = decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)

    lora_modules = find_targets(model, PropulsionConfig(targets="all-linear"))
    lora = sum(lora_rank * (m.in_features + m.out_features) if isinstance(m, nn.Linear)
               else lora_rank * (m.nx + m.nf) for _, m in lora_modules)

    inject(model, propulsion_config or PropulsionConfig())
    trainable = get_state(model).trainable_count

    text = getattr(cfg, "get_text_config", lambda: cfg)()
    return ModelShape(
        source=str(config_path), architecture=type(model).__name__, total_params=total,
        largest_module=largest_name, largest_module_params=largest,
        decoder_layer_params=layer_params, num_layers=len(layers),
        hidden_size=int(text.hidden_size), num_heads=int(text.num_attention_heads),
        vocab_size=int(text.vocab_size), propulsion_trainable=trainable, lora_trainable=lora,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        kv_dim=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        * int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        small_param_numels=sorted(p.numel() for p in params))


# --------------------------------------------------------------------------- ZeRO settings
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


# --------------------------------------------------------------------------- formulas
# bytes per token per decoder layer: (h, d_kv, I, per-head-and-norm, per LoRA rank) coefficients,
# counted with saved_tensors_hooks (module docstring); keyed by (method, bytes per element).
ACTIVATION_COEFFS = {
    ("propulsion", 4): (28, 12, 12, 4, 0), ("propulsion", 2): (18, 8, 10, 4, 0),
    ("lora", 4): (24, 8, 16, 4, 28), ("lora", 2): (16, 4, 8, 4, 14),
    ("full", 4): (32, 8, 16, 4, 0), ("full", 2): (20, 4, 8, 4, 0),
}


def layer_activation_bytes_per_token(method: str, hidden: int, kv_dim: int, intermediate: int,
                                     heads: int, dtype_bytes: int, lora_rank: int = LORA_RANK) -> int:
    ch, ckv, ci, cn, cr = ACTIVATION_COEFFS[(method, 4 if dtype_bytes >= 4 else 2)]
    return ch * hidden + ckv * kv_dim + ci * intermediate + cn * (heads + 2) + cr * lora_rank


def activation_bytes(seq: int, batch: int, hidden: int, heads: int, layers: int,
                     checkpointing: bool, dtype_bytes: int = 2, *, method: str = "propulsion",
                     kv_dim: int | None = None, intermediate: int | None = None) -> int:
    """Saved activations of the decoder layers (module docstring's table)."""
    per_token = layer_activation_bytes_per_token(method, hidden, kv_dim or hidden,
                                                 intermediate or 4 * hidden, heads, dtype_bytes)
    tokens = seq * batch
    if checkpointing:
        return tokens * (layers * hidden * dtype_bytes + per_token)
    return tokens * layers * per_token


def logits_bytes(seq: int, batch: int, vocab: int, dtype_bytes: int = 2) -> int:
    """Held logits + log-softmax's fp32 output + two fp32 gradients in its backward."""
    return seq * batch * vocab * (dtype_bytes + 12)


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class MethodPlan:
    """One method's memory, in bytes. ``gpu`` is per GPU; ``host`` is per node (CPU RAM)."""
    method: str
    trainable: int
    rows: list                  # (label, formula, gpu bytes per GPU, host bytes per GPU)
    model_states_gpu: int
    model_states_host_node: int  # offloaded model states per node, before the buffer factor
    activations_ckpt: int
    activations_full: int
    logits: int
    buffers: int
    checkpointing: bool
    load_peak_host_node: int

    @property
    def activations(self) -> int:
        return self.activations_ckpt if self.checkpointing else self.activations_full

    @property
    def total_gpu(self) -> int:
        return self.model_states_gpu + self.activations + self.logits + self.buffers

    @property
    def host_node(self) -> int:
        """CPU RAM per node: offloaded states (or the zero.Init load peak) x DeepSpeed's 1.5."""
        return int(max(self.model_states_host_node, self.load_peak_host_node)
                   * DS_ADDITIONAL_BUFFER_FACTOR)


def method_plan(method: str, shape: ModelShape, zero: ZeroSettings, cluster: Cluster, *,
                seq: int, batch: int, checkpointing: bool, dtype_bytes: int = 2) -> MethodPlan:
    """Memory of ``method`` ("propulsion", "lora" or "full") on ``cluster`` under ``zero``."""
    P = shape.total_params
    trained = {"propulsion": shape.propulsion_trainable, "lora": shape.lora_trainable,
               "full": P}[method]
    extra = 0 if method == "full" else trained          # adapter tensors live beside the base
    N, G = cluster.gpus, cluster.gpus_per_node
    pb = dtype_bytes
    gb, ob = 4, (12 if dtype_bytes < 4 else 8)           # fp32 grads; master+m+v (no master in fp32)

    p_div = N if zero.stage >= 3 else 1
    g_div = N if zero.stage >= 2 else 1
    o_div = N if zero.stage >= 1 else 1
    name = {"propulsion": "Propulsion", "lora": "LoRA A/B", "full": "all"}[method]

    rows = []

    def row(label, formula, nbytes, offloaded):
        rows.append((label, formula, 0 if offloaded else int(nbytes), int(nbytes) if offloaded else 0))

    tag = "partitioned" if p_div > 1 else "replicated"
    row(f"base parameters ({'bf16' if pb == 2 else 'fp32'}, {tag})", f"P*{pb}/{p_div}",
        P * pb / p_div, zero.offload_param)
    if extra:
        row(f"{name}: parameters", f"T*{pb}/{p_div}", extra * pb / p_div, zero.offload_param)
    row(f"{name}: gradients (fp32)", f"T*{gb}/{g_div}", trained * gb / g_div, zero.offload_optimizer)
    row(f"{name}: optimizer (fp32 master,m,v)" if ob == 12 else f"{name}: optimizer (Adam m,v)",
        f"T*{ob}/{o_div}", trained * ob / o_div, zero.offload_optimizer)
    if zero.stage >= 3:
        lb = 2 * pb if method == "full" else pb
        row("largest module gathered" + (" + its grads" if method == "full" else " (no grads)"),
            f"{lb}*{shape.largest_module_params / 1e6:.0f}M", lb * shape.largest_module_params, False)
        if zero.hpz_partition_size > 1 and not zero.offload_param:
            g = zero.hpz_partition_size
            row(f"ZeRO++ hpZ secondary copy (over {g} GPUs)", f"P*{pb}/{g}", (P + extra) * pb / g, False)

    gpu_states = sum(r[2] for r in rows)
    host_states_node = sum(r[3] for r in rows) * G

    if zero.stage >= 3:
        live = zero3_live_params(shape, zero)
        buffers = pb * (zero.prefetch_bucket_size + zero.reduce_bucket_size
                        + max(0, live - shape.largest_module_params)
                        + shape.persistent_params(zero.persistence_threshold))
        # zero.Init: a rank materialises at most one module before partitioning it (fp32).
        load_peak = 4 * shape.largest_module_params * G
    else:
        # ZeRO-1/2 allocate the reduce (IPG) bucket, twice with overlap_comm; the all-gather of
        # the updated partitions works on the parameters themselves (no bucket-sized buffer).
        buffers = pb * zero.reduce_bucket_size * (2 if zero.overlap_comm else 1) if zero.stage else 0
        load_peak = 4 * P * G
    act = dict(seq=seq, batch=batch, hidden=shape.hidden_size, heads=shape.num_heads,
               layers=shape.num_layers, dtype_bytes=dtype_bytes, method=method,
               kv_dim=shape.kv_dim or None, intermediate=shape.intermediate_size or None)
    return MethodPlan(method=method, trainable=trained, rows=rows, model_states_gpu=int(gpu_states),
                      model_states_host_node=int(host_states_node),
                      activations_ckpt=activation_bytes(checkpointing=True, **act),
                      activations_full=activation_bytes(checkpointing=False, **act),
                      logits=logits_bytes(seq, batch, shape.vocab_size, dtype_bytes),
                      buffers=int(buffers), checkpointing=checkpointing,
                      load_peak_host_node=int(load_peak))


def deepspeed_reference(shape: ModelShape, zero: ZeroSettings, cluster: Cluster) -> tuple[int, int]:
    """(host bytes per node, GPU bytes per GPU) from DeepSpeed's ZeRO-3 estimator, full fine-tuning.

    The same numbers ``estimate_zero3_model_states_mem_needs_all_cold(total_params,
    largest_layer_params, num_gpus_per_node, num_nodes)`` prints for these offload options and
    zero_init=1.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=shape.total_params, largest_layer_params=shape.largest_module_params,
        num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
        cpu_offload=zero.offload_optimizer, cpu_offload_params=zero.offload_param,
        zero_init=True, additional_buffer_factor=DS_ADDITIONAL_BUFFER_FACTOR)
    return int(cpu), int(gpu)


def zero3_live_params(shape: ModelShape, zero: ZeroSettings) -> int:
    """Parameters ZeRO-3 may keep gathered at once. A fetched parameter is not released when its
    next use is within stage3_max_reuse_distance elements and fewer than stage3_max_live_parameters
    are live; backward reuses every parameter of the forward, so with a reuse distance of at least
    the model's size (the shipped configs: 1e9) up to max_live parameters stay gathered."""
    span = shape.total_params if zero.max_reuse_distance >= shape.total_params else shape.decoder_layer_params
    return min(zero.max_live_parameters, span)


# --------------------------------------------------------------------------- layout advice
LAYOUTS = ("replicated", "zero3_hpz", "zero3", "zero3_offload")


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


def recommend_layout(shape: ModelShape, cluster: Cluster, *, seq: int, batch: int, checkpointing: bool,
                     dtype_bytes: int = 2, gpu_memory_gib: float = 80.0,
                     method: str = "propulsion") -> LayoutAdvice:
    """Which layout to train ``method`` with on ``cluster`` (rules in the module docstring).

    Replicating the frozen base removes ZeRO-3's per-module gather/release and per-step
    re-partitioning; it is taken only with REPLICATE_HEADROOM of the usable memory to spare.
    ZeRO++ hpZ needs more than one node (on one node its secondary group is the whole world);
    plain ZeRO-3 needs more than one GPU.
    """
    usable = int(gpu_memory_gib * GIB * (1 - GPU_RESERVE_FRACTION))
    kw = dict(seq=seq, batch=batch, checkpointing=checkpointing, dtype_bytes=dtype_bytes)
    need = {}
    for layout in LAYOUTS:
        if layout == "zero3_hpz" and cluster.nodes == 1:
            continue                    # one node: the secondary group would be the whole world
        if layout == "zero3" and cluster.gpus == 1:
            continue                    # nothing to partition over: only offload saves memory
        z = layout_zero(layout, cluster, shape.hidden_size)
        need[layout] = method_plan(method, shape, z, cluster, **kw).total_gpu
    gib = lambda n: f"{n / GIB:.1f} GiB"                 # noqa: E731
    limit = int(usable * (1 - REPLICATE_HEADROOM))
    if need["replicated"] <= limit:
        layout = "replicated"
        reason = (f"the replicated frozen base fits: {gib(need['replicated'])} per GPU of "
                  f"{gib(usable)} usable (at most {1 - REPLICATE_HEADROOM:.0%} = {gib(limit)}); "
                  f"ZeRO-2 shards only the trained vectors' gradients and optimizer state")
    else:
        why = (f"a replicated base needs {gib(need['replicated'])} per GPU, more than "
               f"{1 - REPLICATE_HEADROOM:.0%} of {gib(usable)} usable")
        layout = next((l for l in ("zero3_hpz", "zero3", "zero3_offload")
                       if l in need and need[l] <= usable), "none")
        if layout == "zero3_hpz":
            reason = (f"{why}; ZeRO-3 with ZeRO++ hpZ over each node's {cluster.gpus_per_node} GPUs "
                      f"({gib(need[layout])} per GPU) keeps the parameter all-gathers inside a node")
        elif layout == "zero3":
            extra = (f"; hpZ's secondary copy does not fit ({gib(need['zero3_hpz'])})"
                     if "zero3_hpz" in need else "")
            reason = f"{why}; ZeRO-3 partitions the base over all {cluster.gpus} GPUs ({gib(need[layout])}){extra}"
        elif layout == "zero3_offload":
            alone = (f"ZeRO-3 on GPUs alone needs {gib(need['zero3'])}" if "zero3" in need
                     else "one GPU has nothing to partition over")
            reason = (f"{why}; {alone}: offload parameters and optimizer state to CPU "
                      f"({gib(need[layout])} per GPU)")
        else:
            reason = (f"{why}; even ZeRO-3 with CPU offload needs {gib(need['zero3_offload'])} per GPU: "
                      f"use more or larger GPUs, a shorter data.max_length or micro-batch, or "
                      f"gradient checkpointing")
    ds = DEEPSPEED_CONFIGS.get(layout)
    overrides = [] if ds is None else [f"deepspeed={ds}"]
    if layout == "zero3_hpz":
        overrides.append(f"deepspeed.zero_optimization.zero_hpz_partition_size={cluster.gpus_per_node}")
    return LayoutAdvice(layout=layout, deepspeed=ds, overrides=overrides, need_bytes=need,
                        usable_bytes=usable, reason=reason)


# --------------------------------------------------------------------------- whole plan
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
        return int(self.gpu_memory_gib * GIB * (1 - GPU_RESERVE_FRACTION))

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
    from propulsion_ds.config.load import load_config, resolve_deepspeed

    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"nodes and gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if not gpu_memory_gib > 0:
        raise PlanError(f"GPU memory must be > 0 GiB, got {gpu_memory_gib}")
    cfg = load_config(path, overrides, check_files=False)
    cfg_path = resolve_model_config(cfg.model.name_or_path, model_config)
    shape = model_shape(cfg_path, cfg.propulsion)
    ds_src = cfg.deepspeed
    cfg = dataclasses.replace(cfg, deepspeed=_resolve_ds_path(cfg.deepspeed))
    ds = resolve_deepspeed(cfg, nodes * gpus_per_node, shape.hidden_size)
    zero = ZeroSettings.from_deepspeed(ds)
    cluster = Cluster(nodes, gpus_per_node)
    dtype_bytes = 4 if cfg.model.dtype == "fp32" else 2
    kw = dict(seq=cfg.data.max_length, batch=cfg.train.micro_batch_size,
              checkpointing=cfg.model.gradient_checkpointing, dtype_bytes=dtype_bytes)
    methods = {m: method_plan(m, shape, zero, cluster, **kw) for m in ("propulsion", "lora", "full")}
    targets = cfg.propulsion.targets if isinstance(cfg.propulsion.targets, str) \
        else ",".join(cfg.propulsion.targets)
    return Plan(run_config=str(path), shape=shape, zero=zero, cluster=cluster,
                seq=cfg.data.max_length, batch=cfg.train.micro_batch_size, dtype=cfg.model.dtype,
                checkpointing=cfg.model.gradient_checkpointing, degree=cfg.propulsion.degree,
                targets=targets, deepspeed_source=ds_src if isinstance(ds_src, str) else "inline",
                methods=methods, gpu_memory_gib=gpu_memory_gib,
                advice=recommend_layout(shape, cluster, gpu_memory_gib=gpu_memory_gib, **kw))


# --------------------------------------------------------------------------- report
def _g(n: float) -> str:
    """GiB with two decimals; amounts under 0.01 GiB in MiB, marked M."""
    if 0 < n < 0.01 * GIB:
        return f"{n / 2 ** 20:8.2f}M"
    return f"{n / GIB:9.2f}"


def format_plan(plan: Plan) -> str:
    s, c, z, p = plan.shape, plan.cluster, plan.zero, plan.propulsion
    N, G = c.gpus, c.gpus_per_node
    out = []
    w = out.append
    w(f"Memory plan for {plan.run_config} on {c.nodes} node(s) x {G} GPU(s) = {N} GPU(s)")
    w(f"  model      {s.architecture} from {s.source}: P = {s.total_params:,} params, "
      f"{s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads, vocab {s.vocab_size}")
    w(f"             largest module {s.largest_module} ({s.largest_module_params:,} params); "
      f"decoder layer {s.decoder_layer_params:,} params")
    w(f"  training   {plan.dtype}, micro_batch_size b = {plan.batch}, max_length s = {plan.seq}, "
      f"gradient checkpointing {'on' if plan.checkpointing else 'off'}")
    w(f"  Propulsion degree {plan.degree}, targets {plan.targets}: T = {p.trainable:,} trainable "
      f"({100 * p.trainable / s.total_params:.4f}% of P)")
    w(f"  DeepSpeed  {plan.deepspeed_source}: {z.describe()}")
    w("")
    w(f"Per GPU (GiB; M = MiB){'':32s}{'GPU':>9s} {'host':>9s}")
    for label, formula, gpu, host in p.rows:
        w(f"  {label:<40s}{formula:>12s} {_g(gpu)} {_g(host)}")
    w(f"  {'= model states':<52s} {_g(p.model_states_gpu)} {_g(p.model_states_host_node / G)}")
    ck_on, ck_off = ("  (used)", "") if plan.checkpointing else ("", "  (used)")
    w(f"  {'activations, checkpointed':<40s}{'':>12s} {_g(p.activations_ckpt)}{ck_on}")
    w(f"  {'activations, no checkpointing':<40s}{'':>12s} {_g(p.activations_full)}{ck_off}")
    w(f"  {'logits + loss':<40s}{'10*s*b*V':>12s} {_g(p.logits)}")
    if z.stage >= 3:
        live = zero3_live_params(s, z)
        w(f"  {'ZeRO-3 buffers':<52s} {_g(p.buffers)}")
        w(f"    prefetch bucket {z.prefetch_bucket_size:,} + reduce bucket {z.reduce_bucket_size:,} elements; "
          f"live layer {live:,} (max_live {z.max_live_parameters:,}); "
          f"persistent {s.persistent_params(z.persistence_threshold):,} (<= {z.persistence_threshold:,})")
    else:
        w(f"  {'ZeRO buckets (all-gather + reduce)':<52s} {_g(p.buffers)}")
    w(f"  {'= total per GPU':<52s} {_g(p.total_gpu)}")
    w("")
    w(f"Per node ({G} GPUs, GiB; M = MiB)")
    w(f"  {'GPU memory, all GPUs of the node':<52s} {_g(p.total_gpu * G)}")
    host_what = ("offloaded states" if p.model_states_host_node >= p.load_peak_host_node
                 else "zero.Init load peak")
    host_label = f"CPU RAM: {host_what} x DeepSpeed's 1.5"
    w(f"  {host_label:<52s} {_g(p.host_node)}")
    w("")
    verdict = "YES" if plan.fits() else "NO"
    w(f"Fits an {plan.gpu_memory_gib:g} GiB GPU: {verdict} ({p.total_gpu / GIB:.1f} GiB needed of "
      f"{plan.usable_gpu_bytes / GIB:.1f} usable; {GPU_RESERVE_FRACTION:.0%} kept for CUDA context, "
      f"NCCL and fragmentation)")
    w("")
    w(f"Comparison, same cluster and DeepSpeed config (GiB){'':6s}model states    total/GPU  CPU/node  fits")
    for m, label in (("propulsion", "Propulsion"), ("lora", f"LoRA r={LORA_RANK}, all linears"),
                     ("full", "full fine-tuning")):
        mp = plan.methods[m]
        w(f"  {label:<28s}{mp.trainable:>16,} trained {_g(mp.model_states_gpu)}    {_g(mp.total_gpu)} "
          f"{_g(mp.host_node)}  {'yes' if plan.fits(m) else 'no'}")
    if z.stage == 3:
        ds_cpu, ds_gpu = deepspeed_reference(s, z, c)
        f = plan.methods["full"]
        w(f"  check: DeepSpeed's estimate_zero3_model_states_mem_needs (full fine-tuning, same offload, "
          f"zero_init): {ds_gpu / GIB:.2f} GiB/GPU, {ds_cpu / GIB:.2f} GiB CPU/node; "
          f"planner: {f.model_states_gpu / GIB:.2f}, {f.host_node / GIB:.2f}")
    a = plan.advice
    if a is not None:
        w("")
        names = {"replicated": "replicated frozen base (ZeRO-2)", "zero3": "ZeRO-3",
                 "zero3_hpz": f"ZeRO-3 + ZeRO++ hpZ ({G} GPUs/node)", "zero3_offload": "ZeRO-3 + CPU offload"}
        w("Layout advice (Propulsion; total per GPU of each layout, GiB):")
        w("  " + ", ".join(f"{names[k]} {_g(v).strip()}" for k, v in a.need_bytes.items()))
        w(f"  recommended: {names.get(a.layout, 'nothing fits')}: {a.reason}")
        if a.overrides:
            w(f"  use: {a.set_args}")
    return "\n".join(out)
