"""What a resume must match: the data position and RNG mean nothing under other values.

Keys are config fields, so a refusal names the field to fix.
"""
from __future__ import annotations

import os

from propulsion_ds.config.load import expand_data_paths


def fingerprint(cfg, trainable: int, n_targets: int) -> dict:
    t, d = cfg.train, cfg.data
    return {"model": cfg.model.name_or_path, "propulsion": cfg.propulsion.to_dict(),
            "trainable": trainable, "targets": n_targets,
            "train.micro_batch_size": t.micro_batch_size,
            "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train.seed": t.seed, "data.train": data_files(d.train), "data.format": d.format,
            "data.max_length": d.max_length, "data.packing": d.packing, "data.template": d.template,
            "data.text_field": d.text_field, "data.eval": None if d.eval is None else data_files(d.eval),
            "data.eval_fraction": d.eval_fraction}


def data_files(spec) -> list:
    """[path, size] of every data file a spec names: a changed file changes the rows."""
    return [[os.path.abspath(f), os.path.getsize(f) if os.path.isfile(f) else None]
            for f in expand_data_paths(spec)]
