"""The rows of bench/speed.py: what each row trains, how one step runs, the micro-batches.

Every row shares the model, the data and the loop (``engine(**batch)``, ``engine.backward``,
``engine.step``, ``loss.item()``); only what trains differs (see bench/speed.py's docstring).
"""
from __future__ import annotations

import copy

if __package__:                 # imported as bench.speed_rows (the tests)
    from . import common
else:                           # bench/speed.py runs as a file: bench/ is sys.path[0]
    import common

ROWS = ["bare", "floor", "propulsion", "ia3", "lora", "full"]
EXTRA_ROWS = ["prop_slice"]          # opt-in: the hook before bench/ (for before/after tables)
LABELS = {"bare": "frozen base fwd+bwd (no DeepSpeed)", "floor": "engine floor (1 scalar)",
          "propulsion": "propulsion-ds k=15", "prop_slice": "propulsion-ds k=15, per-target slice hook (before)",
          "ia3": "peft IA3", "lora": "peft LoRA r=8", "full": "full fine-tuning"}
ORDER = ["bare", "floor", "propulsion", "prop_slice", "ia3", "lora", "full"]
MODELS = {
    # micro-batch, sequence length, warm-up steps, rounds x steps per round (>= 20 measured steps)
    "stories260K": dict(micro_batch=8, seq=128, warmup=5, rounds=40, per_round=2),
    "synth100m": dict(micro_batch=2, seq=128, warmup=2, rounds=20, per_round=2),
    # the real SmolLM2-135M-Instruct (scripts/fetch_smollm2.sh): 10 measured steps per row
    "smollm2": dict(micro_batch=2, seq=128, warmup=2, rounds=5, per_round=2),
}


def settings(args) -> dict:
    """The model's micro-batch, sequence and round plan with the command line's overrides."""
    spec = dict(MODELS[args.model])
    if args.micro_batch:
        spec["micro_batch"] = args.micro_batch
    if args.seq:
        spec["seq"] = args.seq
    if args.quick:
        spec.update(warmup=1, rounds=1)
    if args.rounds:
        spec["rounds"] = args.rounds
    if args.warmup is not None:
        spec["warmup"] = args.warmup
    if args.steps:                                  # measured steps per row
        spec["per_round"] = max(1, -(-args.steps // spec["rounds"]))
    return spec


def _raw_model(model_name: str, dtype: str = "fp32"):
    """The base model; under an alive HfDeepSpeedConfig (ZeRO-3) transformers builds it in zero.Init."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if model_name in ("stories260K", "smollm2"):
        model = AutoModelForCausalLM.from_pretrained(str(common.model_path(model_name)), dtype=dt)
    else:
        model = AutoModelForCausalLM.from_config(common.synthetic_llama_config(), dtype=dt)
    model.config.use_cache = False
    return model


class _SliceHook:
    """The forward hook propulsion-ds had before bench/ (commit 5a57a0a), kept for before/after
    rows: each target slices the flat delta and computes its own (1+delta)**k, and autograd's
    out-of-place multiply saves y (its upcast copy for bf16) for the scale's gradient."""

    def __init__(self, root, lo, hi, degree):
        self.root, self.lo, self.hi, self.degree = root, lo, hi, degree

    def __call__(self, module, args, output):
        import torch
        from propulsion_ds.method.propulsion import DELTA_NAME
        from propulsion_ds.method.scale import scale_from_delta
        scale = scale_from_delta(getattr(self.root, DELTA_NAME)[:, self.lo:self.hi], self.degree)
        dtype = torch.promote_types(output.dtype, scale.dtype)
        return (output.to(dtype) * scale.to(dtype)).to(output.dtype)


class _EmbedScale:
    """Forward hook y -> y * root.bench_scale (an object so the root is looked up, not captured)."""

    def __init__(self, root):
        self.root = root

    def __call__(self, module, args, output):
        return output * self.root.bench_scale


def build_model(row: str, model_name: str, dtype: str = "fp32"):
    """(model, trainable params) for one row; the bare row must be built before HfDeepSpeedConfig."""
    import torch
    from torch import nn
    model = _raw_model(model_name, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if row == "floor":
        model.register_parameter("bench_scale", nn.Parameter(torch.ones(1, dtype=model.dtype)))
        model.get_input_embeddings().register_forward_hook(_EmbedScale(model))
    elif row in ("propulsion", "prop_slice"):
        from propulsion_ds import PropulsionConfig, inject
        from propulsion_ds.method.propulsion import get_state
        inject(model, PropulsionConfig(degree=15, targets="all-linear"))
        if row == "prop_slice":
            state, modules = get_state(model), dict(model.named_modules())
            for handle in state.handles:
                handle.remove()
            state.handles = [modules[s.name].register_forward_hook(
                _SliceHook(model, s.offset, s.offset + s.size, 15)) for s in state.slots]
    elif row in ("ia3", "lora"):
        from peft import get_peft_model
        model = get_peft_model(model, common.ia3_config() if row == "ia3" else common.lora_config(8))
    elif row == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif row != "bare":
        raise ValueError(f"unknown row {row!r}")
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


class Row:
    """One row's model (and engine) plus its step function and measured step times."""

    def __init__(self, name, model_name, ds_config, device, dtype="fp32"):
        import torch
        self.name, self.times, self.cpu_times = name, [], []
        self.model, params = build_model(name, model_name, dtype)
        self.trainable = common.count_trainable(self.model)
        self.engine = None
        if name == "bare":
            self.model.to(device)
            self.embed = self.model.get_input_embeddings()
        else:
            import deepspeed
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
            self.engine, *_ = deepspeed.initialize(model=self.model, model_parameters=params,
                                                   optimizer=opt, config=copy.deepcopy(ds_config))

    def step(self, batch) -> float:
        if self.engine is None:
            with __import__("torch").no_grad():
                emb = self.embed(batch["input_ids"])
            emb.requires_grad_(True)
            rest = {k: v for k, v in batch.items() if k != "input_ids"}   # labels, position_ids or mask
            out = self.model(inputs_embeds=emb, **rest)
            out.loss.backward()
            return out.loss.item()
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        self.engine.step()
        return out.loss.item()

    def optimizer_state_bytes(self) -> int:
        """This rank's optimizer memory: fp32 master partitions + optimizer state (m, v, step).

        DeepSpeed's ZeRO wrapper (``engine.optimizer``) keeps the fp32 master partitions
        (``fp32_partitioned_groups_flat`` at stage 3, ``single_partition_of_fp32_groups`` at 1/2)
        and swaps them into the torch optimizer only inside ``step``; the torch optimizer (reached
        by walking ``.optimizer``) keys its state by them. Counted once each, by identity.
        """
        if self.engine is None:
            return 0
        import torch
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if torch.is_tensor(t) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        model_ids = {id(p) for p in self.model.parameters()}
        opt = self.engine.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            for t in getattr(opt, attr, None) or []:
                add(t)
        while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in model_ids:          # at ZeRO 0 these are the model's own params
                    add(p)
        for key, st in opt.state.items():
            if id(key) not in model_ids:
                add(key)
            for t in st.values():
                add(t)
        return total


def make_batches(model_name, micro_batch, seq, rank, world, device, n):
    """This rank's first ``n`` micro-batches of tinyshakespeare (identical for every row)."""
    from propulsion_ds import data
    tok = common.tokenizer(model_name)
    train, _ = common.shakespeare(tok, seq)
    pad = data.pad_token_id(tok)
    plan = data.epoch_batches(train, micro_batch, rank, world, seed=0, epoch=0)
    plan = (plan * (n // len(plan) + 1))[:n]
    return [{k: v.to(device) for k, v in data.get_batch(train, idx, pad, max_length=seq).items()}
            for idx in plan]
