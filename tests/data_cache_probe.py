"""One rank of the data-cache test (started by torchrun, gloo): load_or_build, then report.

    python -m torch.distributed.run --nproc_per_node 2 tests/data_cache_probe.py CONFIG.json OUT_DIR

CONFIG.json holds {"data": {...DataConfig fields...}, "tokenizer": dir, "cache_dir": dir,
"per_rank_cache": bool, "racy_ns": int (optional)}. With per_rank_cache each rank gets its own
cache_dir and local rank 0, as two nodes with node-local storage would. Each rank writes
OUT_DIR/rank<r>.json: whether it built the cache, the cache path, a hash of its rows, and the files
it read in full to hash them (the seam ``data.cache._hash_file`` is wrapped to list them).
"""
import hashlib
import json
import os
import sys

import torch.distributed as dist
from transformers import AutoTokenizer

import datasets

from propulsion_ds.config import DataConfig
from propulsion_ds import distributed
from propulsion_ds.data import cache as data_cache, load_or_build

HASHED = []
_hash_file = data_cache._hash_file


def _counting_hash_file(path, h):
    HASHED.append(os.path.abspath(path))
    return _hash_file(path, h)


def rows_hash(ds) -> str:
    if ds is None:
        return "none"
    return hashlib.sha256(json.dumps(ds[:], sort_keys=True).encode()).hexdigest()


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    data_cache._hash_file = _counting_hash_file
    if "racy_ns" in spec:
        data_cache.RACY_NS = spec["racy_ns"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local_rank = int(os.environ["LOCAL_RANK"])
    datasets.disable_progress_bars()
    cache_dir = spec["cache_dir"]
    if spec.get("per_rank_cache"):
        cache_dir, local_rank = os.path.join(cache_dir, f"node{rank}"), 0
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    built = load_or_build(DataConfig(**spec["data"]), tok, cache_dir, rank=rank, local_rank=local_rank,
                          barrier=dist.barrier, broadcast=distributed.broadcast_object)
    report = {"rank": rank, "built": built.built, "cache_path": built.cache_path,
              "train": rows_hash(built.train), "eval": rows_hash(built.eval),
              "eval_samples": rows_hash(built.eval_samples), "n_train": len(built.train),
              # memory-mapped, not copied into this process
              "on_disk": bool(built.train.cache_files),
              "hashed": HASHED}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
