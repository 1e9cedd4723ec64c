"""The memory plan as text: what launch/estimate_memory.py prints."""
from __future__ import annotations

from propulsion_ds.tools.memory.estimate import deepspeed_reference
from propulsion_ds.tools.memory.layout import GIB, GPU_RESERVE_FRACTION
from propulsion_ds.tools.memory.plan import Plan
from propulsion_ds.tools.memory.shape import LORA_RANK
from propulsion_ds.tools.memory.zero import zero3_live_params


def _g(n: float) -> str:
    """GiB with two decimals; amounts under 0.01 GiB in MiB, marked M."""
    if 0 < n < 0.01 * GIB:
        return f"{n / 2 ** 20:8.2f}M"
    return f"{n / GIB:9.2f}"


def _header(plan: Plan) -> list:
    s, c, z, p = plan.shape, plan.cluster, plan.zero, plan.propulsion
    return [
        f"Memory plan for {plan.run_config} on {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.gpus} GPU(s)",
        f"  model      {s.architecture} from {s.source}: P = {s.total_params:,} params, "
        f"{s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads, vocab {s.vocab_size}",
        f"             largest module {s.largest_module} ({s.largest_module_params:,} params); "
        f"decoder layer {s.decoder_layer_params:,} params",
        f"  training   {plan.dtype}, micro_batch_size b = {plan.batch}, max_length s = {plan.seq}, "
        f"gradient checkpointing {'on' if plan.checkpointing else 'off'}",
        f"  Propulsion degree {plan.degree}, targets {plan.targets}: T = {p.trainable:,} trainable "
        f"({100 * p.trainable / s.total_params:.4f}% of P)",
        f"  DeepSpeed  {plan.deepspeed_source}: {z.describe()}", ""]


def _per_gpu(plan: Plan) -> list:
    s, z, p, G = plan.shape, plan.zero, plan.propulsion, plan.cluster.gpus_per_node
    out = [f"Per GPU (GiB; M = MiB){'':32s}{'GPU':>9s} {'host':>9s}"]
    out += [f"  {label:<40s}{formula:>12s} {_g(gpu)} {_g(host)}" for label, formula, gpu, host in p.rows]
    out.append(f"  {'= model states':<52s} {_g(p.model_states_gpu)} {_g(p.model_states_host_node / G)}")
    ck_on, ck_off = ("  (used)", "") if plan.checkpointing else ("", "  (used)")
    out.append(f"  {'activations, checkpointed':<40s}{'':>12s} {_g(p.activations_ckpt)}{ck_on}")
    out.append(f"  {'activations, no checkpointing':<40s}{'':>12s} {_g(p.activations_full)}{ck_off}")
    out.append(f"  {'logits + loss':<40s}{'10*s*b*V':>12s} {_g(p.logits)}")
    if z.stage >= 3:
        out.append(f"  {'ZeRO-3 buffers':<52s} {_g(p.buffers)}")
        out.append(f"    gathered at the forward/backward turn {zero3_live_params(s, z):,} params (reuse "
                   f"distance {z.max_reuse_distance:,}, prefetch {z.prefetch_bucket_size:,}, persistent "
                   f"{s.persistent_params(z.persistence_threshold):,} <= {z.persistence_threshold:,}); "
                   f"reduce bucket {z.reduce_bucket_size:,} elements")
    else:
        out.append(f"  {'ZeRO buckets (all-gather + reduce)':<52s} {_g(p.buffers)}")
    out += [f"  {'= total per GPU':<52s} {_g(p.total_gpu)}", ""]
    return out


def _per_node(plan: Plan) -> list:
    p, G = plan.propulsion, plan.cluster.gpus_per_node
    host_what = ("offloaded states" if p.model_states_host_node >= p.load_peak_host_node
                 else "zero.Init load peak")
    host_label = f"CPU RAM: {host_what} x DeepSpeed's 1.5"
    verdict = "YES" if plan.fits() else "NO"
    return [f"Per node ({G} GPUs, GiB; M = MiB)",
            f"  {'GPU memory, all GPUs of the node':<52s} {_g(p.total_gpu * G)}",
            f"  {host_label:<52s} {_g(p.host_node)}", "",
            f"Fits an {plan.gpu_memory_gib:g} GiB GPU: {verdict} ({p.total_gpu / GIB:.1f} GiB needed of "
            f"{plan.usable_gpu_bytes / GIB:.1f} usable; {GPU_RESERVE_FRACTION:.0%} kept for CUDA context, "
            f"NCCL and fragmentation)", ""]


def _comparison(plan: Plan) -> list:
    out = [f"Comparison, same cluster and DeepSpeed config (GiB){'':6s}model states    total/GPU  CPU/node  fits"]
    for m, label in (("propulsion", "Propulsion"), ("lora", f"LoRA r={LORA_RANK}, all linears"),
                     ("full", "full fine-tuning")):
        mp = plan.methods[m]
        out.append(f"  {label:<28s}{mp.trainable:>16,} trained {_g(mp.model_states_gpu)}    {_g(mp.total_gpu)} "
                   f"{_g(mp.host_node)}  {'yes' if plan.fits(m) else 'no'}")
    if plan.zero.stage == 3:
        ds_cpu, ds_gpu = deepspeed_reference(plan.shape, plan.zero, plan.cluster)
        f = plan.methods["full"]
        out.append(f"  check: DeepSpeed's estimate_zero3_model_states_mem_needs (full fine-tuning, same offload, "
                   f"zero_init): {ds_gpu / GIB:.2f} GiB/GPU, {ds_cpu / GIB:.2f} GiB CPU/node; "
                   f"planner: {f.model_states_gpu / GIB:.2f}, {f.host_node / GIB:.2f}")
    return out


def _advice(plan: Plan) -> list:
    a, G = plan.advice, plan.cluster.gpus_per_node
    if a is None:
        return []
    names = {"replicated": "replicated frozen base (ZeRO-2)", "zero3": "ZeRO-3",
             "zero3_hpz": f"ZeRO-3 + ZeRO++ hpZ ({G} GPUs/node)", "zero3_offload": "ZeRO-3 + CPU offload"}
    out = ["", "Layout advice (Propulsion; total per GPU of each layout, GiB):",
           "  " + ", ".join(f"{names[k]} {_g(v).strip()}" for k, v in a.need_bytes.items()),
           f"  recommended: {names.get(a.layout, 'nothing fits')}: {a.reason}"]
    if a.overrides:
        out.append(f"  use: {a.set_args}")
    return out


def format_plan(plan: Plan) -> str:
    return "\n".join(_header(plan) + _per_gpu(plan) + _per_node(plan) + _comparison(plan) + _advice(plan))
