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
from propulsion_ds.data import cache as data_cache
from propulsion_ds.data.cache import HASH_DIR

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


def run_probe(tmp_path, data: dict, cache_dir, per_rank_cache=False, tag="run", ok=True, **extra):
    out = tmp_path / tag
    out.mkdir()
    spec = tmp_path / f"{tag}.json"
    spec.write_text(json.dumps({"data": data, "tokenizer": str(MODEL_DIR), "cache_dir": str(cache_dir),
                                "per_rank_cache": per_rank_cache, **extra}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(PROBE), str(spec), str(out)]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300)
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_tokenize_once_reuse_and_rebuild(tmp_path, data_file, tok):
    cache = tmp_path / "cache"
    # racy_ns=0: the copy made just before counts as old enough for its hash to be kept
    first = run_probe(tmp_path, _data(data_file), cache, tag="first", racy_ns=0)
    assert [r["built"] for r in first] == [True, False]  # only rank 0 tokenized
    # only rank 0 read the data file to key the cache; rank 1 got the key broadcast
    assert first[0]["hashed"].count(str(data_file)) == 1 and first[1]["hashed"] == []
    assert first[0]["cache_path"] == first[1]["cache_path"]
    assert all(r["on_disk"] for r in first)
    for key in ("train", "eval", "eval_samples"):
        assert first[0][key] == first[1][key] != "none"
    meta = json.loads((cache / os.path.basename(first[0]["cache_path"]) / "meta.json").read_text())
    assert meta["built_by"]["rank"] == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(  # no temp dir left
        [os.path.basename(first[0]["cache_path"]), HASH_DIR])

    # the cached rows are the in-memory build's rows
    ref = build_datasets(DataConfig(**_data(data_file)), tok)
    from data_cache_probe import rows_hash
    assert rows_hash(ref.train) == first[0]["train"] and rows_hash(ref.eval_samples) == first[0]["eval_samples"]

    again = run_probe(tmp_path, _data(data_file), cache, tag="again", racy_ns=0)  # a requeued job
    assert [r["built"] for r in again] == [False, False]
    assert str(data_file) not in again[0]["hashed"] and again[1]["hashed"] == []  # unchanged: not read again
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


@pytest.fixture
def hash_reads(monkeypatch):
    """The data files read in full to hash them (the seam ``cache._hash_file``, wrapped)."""
    reads = []
    real = data_cache._hash_file

    def counting(path, h):
        reads.append(os.path.abspath(path))
        return real(path, h)

    monkeypatch.setattr(data_cache, "_hash_file", counting)
    return reads


def _rewrite_same_size_same_mtime(path):
    """Swap two different bytes in place, then set the mtime back: only the ctime shows it."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        raw = f.read()
        i = raw.index(b"a")
        j = next(k for k in range(i + 1, len(raw)) if raw[k] not in (raw[i], ord("\n")))
        f.seek(i), f.write(raw[j:j + 1]), f.seek(j), f.write(raw[i:i + 1])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_key_hash_is_kept_and_catches_a_same_size_same_mtime_change(tmp_path, data_file, tok, hash_reads,
                                                                    monkeypatch):
    cfg, hashes = DataConfig(**_data(data_file)), str(tmp_path / "hashes")
    mine = lambda: [p for p in hash_reads if p == str(data_file)]  # noqa: E731
    # a file changed just before its hashing (racily clean): its hash is not trusted next time
    key = cache_key(fingerprint(cfg, tok, hashes))
    assert cache_key(fingerprint(cfg, tok, hashes)) == key and len(mine()) == 2
    monkeypatch.setattr(data_cache, "RACY_NS", 0)     # as if the file were old
    hash_reads.clear()
    assert cache_key(fingerprint(cfg, tok, hashes)) == key and cache_key(fingerprint(cfg, tok, hashes)) == key
    assert mine() == []                               # the kept hash: not read again
    _rewrite_same_size_same_mtime(data_file)
    changed = cache_key(fingerprint(cfg, tok, hashes))
    assert changed != key and len(mine()) == 1
    assert changed == cache_key(fingerprint(cfg, tok))   # what a fresh read says
    # a file replaced by another of the same size and mtime (a copy over it): a new inode
    other = tmp_path / "other.jsonl"
    shutil.copy(data_file, other)
    _rewrite_same_size_same_mtime(other)
    st = os.stat(data_file)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, data_file)
    assert cache_key(fingerprint(cfg, tok, hashes)) == cache_key(fingerprint(cfg, tok)) != changed


def test_data_contents_of_a_built_cache(tmp_path, data_file, tok):
    """What the checkpoint fingerprint reads: the data files' contents as the cache was keyed."""
    built = load_or_build(DataConfig(**_data(data_file)), tok, str(tmp_path / "c"))
    contents = data_cache.data_contents(built.cache_path)
    assert contents["eval"] is None and [f["path"] for f in contents["train"]] == [str(data_file)]
    assert contents["train"] == data_cache.files_fingerprint(str(data_file))


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
