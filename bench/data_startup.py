"""Data start-up on 2 ranks: every rank tokenizing in memory (before) vs the shared cache (after).

    python bench/data_startup.py [--mb 100] [--out-dir bench/results]

Writes a ~100 MB instruction JSONL (real GSM8K train rows, repeated) to a temp dir, then runs
three 2-rank torchrun jobs (gloo) over it, with the stories260K tokenizer, max_length 512, packing:

* before: every rank calls ``build_datasets`` (in memory), as the engine did;
* after, first run: ``load_or_build``: rank 0 tokenizes into the cache, rank 1 waits, both map it;
* after, requeued run: the cache exists, both ranks only memory-map it.

Per rank: seconds from the start of the data step until the rows are ready, resident memory after
(RSS) and the peak (VmHWM) since the step began. Nothing large stays in the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # a sibling: bench/ is sys.path[0] when a bench script runs as a file

GSM8K = Path("/work/shared/data/gsm8k_train.jsonl")
MAX_LENGTH = 512


def make_jsonl(path: Path, mb: float) -> int:
    rows = [json.loads(x) for x in open(GSM8K)]
    lines = [json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n" for r in rows]
    size, n = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            for line in lines:
                f.write(line)
                size += len(line.encode())
                n += 1
                if size >= mb * 1e6:
                    break
    return n


def worker(mode: str, data_file: str, cache_dir: str, out: str) -> None:
    import torch.distributed as dist
    import datasets
    from transformers import AutoTokenizer
    from propulsion_ds import data
    from propulsion_ds.config import DataConfig
    datasets.disable_progress_bars()
    dist.init_process_group("gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    tok = AutoTokenizer.from_pretrained(str(common.STORIES))
    cfg = DataConfig(train=data_file, format="instruction", max_length=MAX_LENGTH, packing=True)
    dist.barrier()
    common.reset_peak_rss()
    rss0 = common.current_rss_bytes()
    t0 = time.perf_counter()
    if mode == "before":
        built = data.build_datasets(cfg, tok, cache_dir=os.path.join(cache_dir, "hf"))
    else:
        built = data.load_or_build(cfg, tok, cache_dir, rank=rank, local_rank=local_rank, barrier=dist.barrier)
    # a memory-mapped cache is file-backed page cache, shared by the ranks of a node and counted in
    # a rank's RSS only for the pages it has read: RSS here is what each rank holds privately
    n = len(built.train)
    dt = time.perf_counter() - t0
    report = {"rank": rank, "seconds": dt, "rss_before": rss0, "rss_after": common.current_rss_bytes(),
              "peak": common.hwm_rss_bytes(), "rows": n, "built": built.built}
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, data_file: Path, cache_dir: Path, out: Path, port: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--worker", mode.split(":")[0], str(data_file), str(cache_dir), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    reports = [json.load(open(out / f"{mode.split(':')[0]}-rank{r}.json")) for r in (0, 1)]
    for r in reports:
        r["job_wall"] = wall
        r["mode"] = mode
    return reports


def table(rows, info, mb, n_rows) -> str:
    gib = 2**30
    lines = [f"Data start-up, {info['date']}, {info['platform']}, {info['cpu_cores']} cores, "
             f"{common.load_note(info['load_avg_1m'], info['cpu_cores'])}; {mb:.0f} MB JSONL ({n_rows} GSM8K rows, "
             f"instruction, stories260K tokenizer, max_length {MAX_LENGTH}, packed), 2 ranks (torchrun, gloo)", "",
             "| run | rank | tokenized here | data step (s) | RSS after (GiB) | peak RSS in step (GiB) | job wall (s) |",
             "|---|---|---|---|---|---|---|"]
    names = {"before": "before: every rank tokenizes in memory", "after:first": "after: cache, first run",
             "after:again": "after: cache, requeued run"}
    for r in rows:
        lines.append(f"| {names[r['mode']]} | {r['rank']} | {'yes' if r['built'] else 'no'} | {r['seconds']:.1f} | "
                     f"{r['rss_after'] / gib:.2f} | {r['peak'] / gib:.2f} | {r['job_wall']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--out-dir", default=str(common.RESULTS))
    args = ap.parse_args()
    common.quiet()
    load0 = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_file, cache_dir, out = tmp / "train.jsonl", tmp / "cache", tmp / "reports"
        out.mkdir()
        n_rows = make_jsonl(data_file, args.mb)
        mb = data_file.stat().st_size / 1e6
        rows = []
        for mode in ("before", "after:first", "after:again"):
            rows += launch(mode, data_file, cache_dir, out, _free_port())
            print(f"{mode}: done", flush=True)
        cache_mb = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 1e6
    info = common.machine("cpu", 2, "gloo")
    info["load_avg_1m_start"] = load0
    text = table(rows, info, mb, n_rows) + f"\n\nCache on disk: {cache_mb:.0f} MB."
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "data_startup.json"), "w") as f:
        json.dump({"machine": info, "mb": mb, "rows": rows, "cache_mb": cache_mb}, f, indent=1)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
