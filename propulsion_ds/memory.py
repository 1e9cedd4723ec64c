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

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, eq. 1, no tensor/sequence parallelism), bytes in 16-bit:
  per decoder layer, no checkpointing:  s*b*h*(34 + 5*a*s/h)
  with (full) activation checkpointing: 2*s*b*h per layer (each layer's 16-bit input is kept)
                                        + one layer's full activations (recomputed in backward)
  logits and loss:                      s*b*V*(2 + 4 + 4)  (16-bit logits, fp32 upcast for the
                                        loss, fp32 log-softmax kept for backward)
with s = data.max_length, b = train.micro_batch_size, h = hidden size, a = attention heads,
V = vocabulary. The 5*a*s/h term is the stored attention matrix of eager attention; SDPA/flash
attention does not keep it, so the figure is an upper bound there. The same activation figures
are used for Propulsion, LoRA and full fine-tuning (they differ by what each saves for its own
backward, which is small next to this). fp32 runs double the 16-bit figures.

ZeRO-3 working buffers (from the DeepSpeed config, "auto" filled as the engine does: h*h,
0.9*h*h, 10*h): the prefetch bucket (stage3_prefetch_bucket_size 16-bit elements), the reduce
(IPG) bucket (reduce_bucket_size elements, allocated with contiguous_gradients), the rest of a
decoder layer that stays gathered between recompute and backward beyond the largest module
(capped by stage3_max_live_parameters), and the small "persistent" parameters (numel <=
stage3_param_persistence_threshold) that every GPU keeps whole. ZeRO-2: the all-gather and reduce
buckets.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2 ** 30
REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL_CONFIGS = REPO_ROOT / "configs" / "models"
DS_ADDITIONAL_BUFFER_FACTOR = 1.5     # DeepSpeed's estimator: host pinned buffers, allocator slack
GPU_RESERVE_FRACTION = 0.10           # CUDA context, NCCL buffers, fragmentation
LORA_RANK = 8


class PlanError(ValueError):
    """A planner input that cannot be used; the message is one line."""


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

    from .propulsion import PropulsionConfig, get_state, inject
    from .targets import decoder_layers, find_targets

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
    allgather_bucket_size: int = 500_000_000

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
                   allgather_bucket_size=num("allgather_bucket_size", d.allgather_bucket_size))

    def describe(self) -> str:
        s = f"ZeRO stage {self.stage}"
        if self.stage >= 1:
            s += (f", offload_param={'cpu' if self.offload_param else 'none'}"
                  f", offload_optimizer={'cpu' if self.offload_optimizer else 'none'}")
        return s


# --------------------------------------------------------------------------- formulas
def activation_bytes(seq: int, batch: int, hidden: int, heads: int, layers: int,
                     checkpointing: bool, dtype_bytes: int = 2) -> int:
    """Korthikanti et al. eq. 1 (see the module docstring); 16-bit figures scaled by dtype."""
    sbh = seq * batch * hidden
    per_layer = sbh * (34 + 5 * heads * seq / hidden)
    total = (layers * 2 * sbh + per_layer) if checkpointing else layers * per_layer
    return int(total * dtype_bytes / 2)


def logits_bytes(seq: int, batch: int, vocab: int, dtype_bytes: int = 2) -> int:
    return seq * batch * vocab * (dtype_bytes + 4 + 4)


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

    gpu_states = sum(r[2] for r in rows)
    host_states_node = sum(r[3] for r in rows) * G

    if zero.stage >= 3:
        live = min(zero.max_live_parameters, shape.decoder_layer_params)
        buffers = pb * (zero.prefetch_bucket_size + zero.reduce_bucket_size
                        + max(0, live - shape.largest_module_params)
                        + shape.persistent_params(zero.persistence_threshold))
        # zero.Init: a rank materialises at most one module before partitioning it (fp32).
        load_peak = 4 * shape.largest_module_params * G
    else:
        buffers = pb * (zero.allgather_bucket_size + zero.reduce_bucket_size) if zero.stage else 0
        load_peak = 4 * P * G
    act = dict(seq=seq, batch=batch, hidden=shape.hidden_size, heads=shape.num_heads,
               layers=shape.num_layers, dtype_bytes=dtype_bytes)
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
    from .config_load import load_config, resolve_deepspeed

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
                methods=methods, gpu_memory_gib=gpu_memory_gib)


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
        live = min(z.max_live_parameters, s.decoder_layer_params)
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
    return "\n".join(out)
