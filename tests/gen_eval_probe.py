"""Probe for tests/test_gen_eval.py: generation_eval on N ranks under real ZeRO-3 partitioning.

    torchrun --nproc_per_node 2 tests/gen_eval_probe.py --rows rows.jsonl --delta delta.pt \
        --eos 2,426 --max-new-tokens 24 --batch-sizes 1,3 --out result.json

Builds the real stories260K under ``deepspeed.zero.Init`` with ``stage3_param_persistence_threshold:
0`` (every weight is partitioned, checked), injects Propulsion, loads the given delta (so the hooks
change what the model says), wraps it with ``deepspeed.initialize`` (as the trainer does: the
delta is converted to a ZeRO-3 parameter there) and runs ``generation_eval(engine.module, ...)``
once per batch size on the rows (input_ids/labels). Rank 0 writes the results to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", required=True)
    p.add_argument("--delta", required=True)
    p.add_argument("--eos", required=True, help="comma-separated stop token ids")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--metric", default="exact")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from propulsion_ds import distributed as dist
    from propulsion_ds.train import gen_eval
    from propulsion_ds.config import EvalConfig, ModelConfig
    from propulsion_ds.model import load_base_model, load_tokenizer
    from propulsion_ds.method.propulsion import DELTA_NAME, PropulsionConfig, inject, trainable_parameters

    # A short collective timeout: a rank left waiting in a gather errors out instead of hanging 30 min.
    dist.init_distributed(timeout_minutes=1.0)
    import deepspeed

    rank, world = dist.rank(), dist.world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "train_batch_size": world, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model_dir = str(ROOT / "assets" / "stories260K")
    tok = load_tokenizer(model_dir)
    model, keepalive = load_base_model(ModelConfig(name_or_path=model_dir), ds_config)
    inject(model, PropulsionConfig())
    q = model.model.layers[0].self_attn.q_proj.weight
    partitioned = {"local": q.ds_tensor.numel(), "full": q.ds_numel}
    assert partitioned["local"] < partitioned["full"], partitioned
    with torch.no_grad():             # still a plain tensor: deepspeed.initialize partitions it
        getattr(model, DELTA_NAME).copy_(torch.load(args.delta))
    params = trainable_parameters(model)
    # lr 0: the training step below runs ZeRO-3's whole forward/backward/step cycle (release,
    # re-partition, its recorded module trace) without moving the vectors the references used.
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.AdamW(params, lr=0.0, weight_decay=0.0))
    module = engine.module
    module.generation_config.eos_token_id = [int(t) for t in args.eos.split(",")]

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    row = rows[rank % len(rows)]
    engine.train()                      # generation comes between training steps in the trainer
    out = engine(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
    engine.backward(out.loss)
    engine.step()

    cfg = EvalConfig(generate=True, generate_samples=len(rows), max_new_tokens=args.max_new_tokens,
                     metric=args.metric)
    d = getattr(module, DELTA_NAME)
    assert hasattr(d, "ds_id"), "the delta should be a ZeRO-3 parameter after deepspeed.initialize"
    results = {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        dist.barrier()
        start = time.perf_counter()
        res = gen_eval.generation_eval(module, tok, rows, cfg, rank=rank, world_size=world,
                                       device=engine.device, zero3=True, batch_size=bs)
        results[str(bs)] = {**res, "training_after": module.training,
                            "seconds": time.perf_counter() - start}
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "partitioned": partitioned,
                                              "results": results}))
    del keepalive
    dist.barrier()


if __name__ == "__main__":
    main()
