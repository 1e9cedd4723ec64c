"""Memory planner: what a Propulsion run needs per GPU and per node, before any weight is loaded.

``shape``: the model's counts, read off the model built on the meta device. ``zero``: the ZeRO
settings and what ZeRO-3 keeps gathered. ``estimate``: bytes per GPU of one method (model states,
activations, logits, ZeRO buffers). ``layout``: which shipped DeepSpeed layout to use. ``plan``:
a run config's whole plan; ``report``: it as text (launch/estimate_memory.py). bench/memory_check.py
compares the estimate with the peak measured on SmolLM2-135M.
"""
from propulsion_ds.errors import PlanError
from propulsion_ds.tools.memory.estimate import (ACTIVATION_COEFFS, DS_ADDITIONAL_BUFFER_FACTOR, MethodPlan,
                                                 activation_bytes, deepspeed_reference,
                                                 layer_activation_bytes_per_token, logits_bytes,
                                                 mask_bytes_per_token, method_plan, trained_count)
from propulsion_ds.tools.memory.layout import (DEEPSPEED_CONFIGS, GIB, GPU_RESERVE_FRACTION, LAYOUTS,
                                               REPLICATE_HEADROOM, LayoutAdvice, layout_zero,
                                               recommend_layout)
from propulsion_ds.tools.memory.plan import Plan, plan_from_run_config
from propulsion_ds.tools.memory.report import format_plan
from propulsion_ds.tools.memory.shape import (LORA_RANK, REPO_ROOT, SHIPPED_MODEL_CONFIGS, ModelShape,
                                              model_shape, resolve_model_config)
from propulsion_ds.tools.memory.zero import Cluster, ZeroSettings, zero3_live_params

__all__ = ["ACTIVATION_COEFFS", "DEEPSPEED_CONFIGS", "DS_ADDITIONAL_BUFFER_FACTOR", "GIB",
           "GPU_RESERVE_FRACTION", "LAYOUTS", "LORA_RANK", "REPLICATE_HEADROOM", "REPO_ROOT",
           "SHIPPED_MODEL_CONFIGS", "Cluster", "LayoutAdvice", "MethodPlan", "ModelShape", "Plan",
           "PlanError", "ZeroSettings", "activation_bytes", "deepspeed_reference", "format_plan",
           "layer_activation_bytes_per_token", "layout_zero", "logits_bytes", "mask_bytes_per_token",
           "method_plan", "model_shape", "plan_from_run_config", "recommend_layout",
           "resolve_model_config", "trained_count", "zero3_live_params"]
