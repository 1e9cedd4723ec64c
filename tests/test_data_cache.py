"""The tokenized-data cache (docs/RELIABILITY.md "The tokenized-data cache"): tokenized once, not once per rank.

Two real processes (torchrun, gloo, tests/data_cache_probe.py) call ``load_or_build``: exactly one
builds, both memory-map identical rows equal to an in-memory build, a second run reuses the cache,
a changed setting, data file or tokenizer gets a new cache, and node-local storage (each rank its
own directory) makes each node's local rank 0 build its own copy. Real stories260K tokenizer,
real self-instruct rows."""
import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
from transformers import AutoTokenizer

from helpers import ROOT, free_port, train_env
from propulsion_ds.config import DataConfig
from propulsion_ds.data import DataError, build_datasets, cache_key, fingerprint, load_or_build

pytestmark = pytest.mark.slow

SELF_INSTRUCT = ROOT / "assets" / "data" / "self_instruct.jsonl"
MODEL_DIR = ROOT / "assets" / "stories260K"
PROBE = ROOT / "tests" / "data_cache_probe.py"

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    shutil.copy(SELF_INSTRUCT, path)
    return path


def _data(path, **kw):
    d = dict(train=str(path), format="instruction", max_length=512, packing=True, eval_fraction=0.1,
             template="Q: {instruction} {input}\nA: ")
    d.update(kw)
    return d


def run_probe(tmp_path, data: dict, cache_dir, per_rank_cache=False, tag="run", ok=True):
    out = tmp_path / tag
    out.mkdir()
    spec = tmp_path / f"{tag}.json"
    spec.write_text(json.dumps({"data": data, "tokenizer": str(MODEL_DIR), "cache_dir": str(cache_dir),
                                "per_rank_cache": per_rank_cache}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(PROBE), str(spec), str(out)]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300)
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_tokenize_once_reuse_and_rebuild(tmp_path, data_file, tok):
    cache = tmp_path / "cache"
    first = run_probe(tmp_path, _data(data_file), cache, tag="first")
    assert [r["built"] for r in first] == [True, False]  # only rank 0 tokenized
    assert first[0]["cache_path"] == first[1]["cache_path"]
    assert all(r["on_disk"] for r in first)
    for key in ("train", "eval", "eval_samples"):
        assert first[0][key] == first[1][key] != "none"
    meta = json.loads((cache / os.path.basename(first[0]["cache_path"]) / "meta.json").read_text())
    assert meta["built_by"]["rank"] == 0
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first[0]["cache_path"])]  # no temp dir left

    # the cached rows are the in-memory build's rows
    ref = build_datasets(DataConfig(**_data(data_file)), tok)
    from data_cache_probe import rows_hash
    assert rows_hash(ref.train) == first[0]["train"] and rows_hash(ref.eval_samples) == first[0]["eval_samples"]

    again = run_probe(tmp_path, _data(data_file), cache, tag="again")  # a requeued job
    assert [r["built"] for r in again] == [False, False]
    assert again[0]["cache_path"] == first[0]["cache_path"] and again[0]["train"] == first[0]["train"]

    changed = run_probe(tmp_path, _data(data_file, max_length=256), cache, tag="changed")
    assert [r["built"] for r in changed] == [True, False]
    assert changed[0]["cache_path"] != first[0]["cache_path"] and changed[0]["train"] != first[0]["train"]


def test_node_local_storage_each_node_builds_its_own(tmp_path, data_file):
    reports = run_probe(tmp_path, _data(data_file), tmp_path / "cache", per_rank_cache=True)
    assert [r["built"] for r in reports] == [True, True]  # rank 1 = local rank 0 of another "node"
    assert reports[0]["cache_path"] != reports[1]["cache_path"]
    assert reports[0]["train"] == reports[1]["train"]


def test_key_follows_data_tokenizer_and_settings(tmp_path, data_file, tok):
    cfg = DataConfig(**_data(data_file))
    key = cache_key(fingerprint(cfg, tok))
    assert key == cache_key(fingerprint(DataConfig(**_data(data_file, num_proc=2)), tok))  # no effect on rows
    for change in (dict(packing=False), dict(format="instruction", template=None), dict(eval_fraction=0.2),
                   dict(max_length=511)):
        assert cache_key(fingerprint(DataConfig(**_data(data_file, **change)), tok)) != key, change
    with open(data_file, "a") as f:  # same path, new content
        f.write(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    assert cache_key(fingerprint(cfg, tok)) != key
    other = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "llama2-tokenizer"))
    assert cache_key(fingerprint(cfg, other)) != cache_key(fingerprint(cfg, tok))


def test_single_process_build_error_and_num_proc(tmp_path, data_file, tok, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_or_build(DataConfig(train=str(bad), format="instruction"), tok, str(tmp_path / "out" / "c"))
    assert not (tmp_path / "out").exists()  # bad input leaves no trace: not even the directories
    built = load_or_build(DataConfig(**_data(data_file, num_proc=2)), tok, str(tmp_path / "c"))
    ref = build_datasets(DataConfig(**_data(data_file)), tok)
    assert built.built and built.train[:] == ref.train[:] and built.eval[:] == ref.eval[:]


def test_a_failed_build_stops_both_ranks_without_a_hang(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    proc = run_probe(tmp_path, _data(bad, eval_fraction=0.0), tmp_path / "cache", ok=False)  # timeout=300 s
    assert proc.returncode != 0
    # rank 0's own error, and rank 1 names the same cause (it checks its files once the cache is missing)
    assert proc.stderr.count("bad.jsonl:2: not valid JSON") >= 2, proc.stderr[-3000:]
