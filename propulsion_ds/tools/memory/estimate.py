"""Per-GPU bytes of one method: model states, activations, logits and ZeRO buffers.

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
ZeRO-3's gathered parameters beyond the largest module and the ZeRO buckets: ``zero.py``.

Activations: bytes that autograd saves for backward, per token and decoder layer, counted on
LLaMA layers (transformers 5.24, SDPA attention, torch 2.13) with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters excluded) while varying
the hidden size h, the K/V width d_kv = kv_heads*head_dim, the MLP width I and the heads a one at
a time; linear in each and in the sequence length (no s^2 term: SDPA keeps only the log-sum-exp
per head). ``tests/test_memory.py`` re-counts them on the real stories260K and SmolLM2 shapes.
  method       fp32                                 bf16
  propulsion   28h + 12 d_kv + 12 I + 4(a+2)        18h + 6 d_kv +  6 I + 4(a+2)
  LoRA r       24h +  8 d_kv + 16 I + 4(a+2) + 28r  16h + 4 d_kv +  8 I + 4(a+2) + 14r
  full         32h +  8 d_kv + 16 I + 4(a+2)        20h + 4 d_kv +  8 I + 4(a+2)
(bf16 runs keep the RMSNorms' fp32 upcasts. A frozen base saves no linear inputs; Propulsion's
scale gradient needs each target's output y', which it saves in the model dtype and which the next
op keeps anyway for v (attention), gate (SiLU) and up (the product): only q', k', o' and down'
(3h + d_kv) are Propulsion's own. LoRA keeps each target's input (shared by q/k/v and by gate/up,
and o's is attention's own output) and the r-wide A outputs. What this means per model:
docs/MEMORY.md.) With (full)
activation checkpointing each layer keeps only its input (h per token, model dtype) and one layer
is recomputed with all of the above. Eager attention also stores the s x s attention matrix per
head, which this table does not count.
Masked attention (``masked``: packed rows, whose document boundaries transformers turns into a
mask, or padded ones): SDPA then gets K and V repeated to all heads (no GQA fast path) and the
s x s mask, so each layer saves dtype x (2(h - d_kv) + s) more bytes per token, and Propulsion
dtype x d_kv more: attention keeps the repeated V, so the v' Propulsion saves is no longer shared
(counted the same way on SmolLM2-135M; ``tests/test_memory_estimate.py`` re-counts it).
Logits and loss, bytes per token per vocabulary entry: the logits the caller holds (model dtype)
+ log-softmax's saved fp32 output + two fp32 gradients alive during its backward = dtype + 12.
s = data.max_length, b = train.micro_batch_size, V = vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

from propulsion_ds.tools.memory.shape import LORA_RANK, ModelShape
from propulsion_ds.tools.memory.zero import Cluster, ZeroSettings, zero3_live_params

DS_ADDITIONAL_BUFFER_FACTOR = 1.5     # DeepSpeed's estimator: host pinned buffers, allocator slack

# bytes per token per decoder layer: (h, d_kv, I, per-head-and-norm, per LoRA rank) coefficients,
# counted with saved_tensors_hooks (module docstring); keyed by (method, bytes per element).
ACTIVATION_COEFFS = {
    ("propulsion", 4): (28, 12, 12, 4, 0), ("propulsion", 2): (18, 6, 6, 4, 0),
    ("lora", 4): (24, 8, 16, 4, 28), ("lora", 2): (16, 4, 8, 4, 14),
    ("full", 4): (32, 8, 16, 4, 0), ("full", 2): (20, 4, 8, 4, 0),
}


def layer_activation_bytes_per_token(method: str, hidden: int, kv_dim: int, intermediate: int,
                                     heads: int, dtype_bytes: int, lora_rank: int = LORA_RANK) -> int:
    ch, ckv, ci, cn, cr = ACTIVATION_COEFFS[(method, 4 if dtype_bytes >= 4 else 2)]
    return ch * hidden + ckv * kv_dim + ci * intermediate + cn * (heads + 2) + cr * lora_rank


def mask_bytes_per_token(seq: int, hidden: int, kv_dim: int, dtype_bytes: int,
                         method: str = "propulsion") -> int:
    """What masked SDPA saves on top, per token and layer: K, V repeated to all heads, the mask;
    for Propulsion also its v' (attention now keeps the repeated V, not v')."""
    return dtype_bytes * (2 * (hidden - kv_dim) + seq + (kv_dim if method == "propulsion" else 0))


def activation_bytes(seq: int, batch: int, hidden: int, heads: int, layers: int,
                     checkpointing: bool, dtype_bytes: int = 2, *, method: str = "propulsion",
                     kv_dim: int | None = None, intermediate: int | None = None,
                     masked: bool = False) -> int:
    """Saved activations of the decoder layers (module docstring's table)."""
    kv_dim = kv_dim or hidden
    per_token = layer_activation_bytes_per_token(method, hidden, kv_dim, intermediate or 4 * hidden,
                                                 heads, dtype_bytes)
    if masked:
        per_token += mask_bytes_per_token(seq, hidden, kv_dim, dtype_bytes, method)
    tokens = seq * batch
    if checkpointing:
        return tokens * (layers * hidden * dtype_bytes + per_token)
    return tokens * layers * per_token


def logits_bytes(seq: int, batch: int, vocab: int, dtype_bytes: int = 2) -> int:
    """Held logits + log-softmax's fp32 output + two fp32 gradients in its backward."""
    return seq * batch * vocab * (dtype_bytes + 12)


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


def trained_count(method: str, shape: ModelShape) -> int:
    return {"propulsion": shape.propulsion_trainable, "lora": shape.lora_trainable,
            "full": shape.total_params}[method]


def _state_rows(method: str, shape: ModelShape, zero: ZeroSettings, cluster: Cluster, pb: int) -> list:
    """(label, formula, GPU bytes, host bytes) per model state, per GPU."""
    P, N = shape.total_params, cluster.gpus
    trained = trained_count(method, shape)
    extra = 0 if method == "full" else trained          # adapter tensors live beside the base
    gb, ob = 4, (12 if pb < 4 else 8)                    # fp32 grads; master+m+v (no master in fp32)
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
    return rows


def _buffers(shape: ModelShape, zero: ZeroSettings, pb: int) -> int:
    """ZeRO working memory beyond the model-state rows (zero.py's docstring)."""
    if zero.stage >= 3:
        # the gathered parameters beyond the largest module (a model-state row) + the reduce bucket
        return pb * (zero.reduce_bucket_size + max(0, zero3_live_params(shape, zero) - shape.largest_module_params))
    # ZeRO-1/2 allocate the reduce (IPG) bucket, twice with overlap_comm; the all-gather of
    # the updated partitions works on the parameters themselves (no bucket-sized buffer).
    return pb * zero.reduce_bucket_size * (2 if zero.overlap_comm else 1) if zero.stage else 0


def method_plan(method: str, shape: ModelShape, zero: ZeroSettings, cluster: Cluster, *,
                seq: int, batch: int, checkpointing: bool, dtype_bytes: int = 2,
                masked: bool = False) -> MethodPlan:
    """Memory of ``method`` ("propulsion", "lora" or "full") on ``cluster`` under ``zero``."""
    rows = _state_rows(method, shape, zero, cluster, dtype_bytes)
    G = cluster.gpus_per_node
    # zero.Init: a rank materialises at most one module before partitioning it (fp32); without
    # it every rank loads the whole model.
    load_peak = 4 * (shape.largest_module_params if zero.stage >= 3 else shape.total_params) * G
    act = dict(seq=seq, batch=batch, hidden=shape.hidden_size, heads=shape.num_heads,
               layers=shape.num_layers, dtype_bytes=dtype_bytes, method=method,
               kv_dim=shape.kv_dim or None, intermediate=shape.intermediate_size or None, masked=masked)
    return MethodPlan(method=method, trainable=trained_count(method, shape), rows=rows,
                      model_states_gpu=int(sum(r[2] for r in rows)),
                      model_states_host_node=int(sum(r[3] for r in rows) * G),
                      activations_ckpt=activation_bytes(checkpointing=True, **act),
                      activations_full=activation_bytes(checkpointing=False, **act),
                      logits=logits_bytes(seq, batch, shape.vocab_size, dtype_bytes),
                      buffers=int(_buffers(shape, zero, dtype_bytes)), checkpointing=checkpointing,
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
