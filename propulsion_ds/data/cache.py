"""Tokenize once, not once per rank: a fingerprinted on-disk cache of the built data sets.

``load_or_build`` is called by every rank. The global rank 0 builds the cache first (it is enough
when ``cache_dir`` is on storage every node shares); after a barrier, the local rank 0 of any node
that still does not see it builds it on that node's own storage; after a second barrier every rank
memory-maps the arrow files with ``datasets.load_from_disk``, so N ranks hold one copy in the page
cache instead of N tokenized copies in their heaps.

The cache directory is ``<cache_dir>/<key>``; the key hashes everything the rows depend on: the
data files (path, size, content), the tokenizer (its files, vocabulary, special tokens and chat
template), the data settings (format, max_length, packing, template, text_field, eval settings)
and ``CACHE_VERSION`` (bump it whenever a change here or in tokenizing/packing changes the rows).
A build is written to a temporary directory and renamed into place, so a killed build never leaves
a half-written cache, and a requeued job with the same inputs reuses it.

The key is computed once, on rank 0, and broadcast: the other ranks never read the data files to
key the cache. Rank 0 keeps each file's content hash in ``<cache_dir>/hashes/`` together with the
file's size, mtime, ctime, inode and device, and re-reads a file only when one of those changed,
so an unchanged 50 GB file costs a ``stat`` at each start. What a change of contents is caught by:
any write changes the ctime (which no user call can set back, unlike the mtime: ``touch -d`` or
``os.utime`` after a same-size rewrite still changes the ctime), and a replaced file (rename, copy
over) changes the inode. A hash is trusted only for a file whose mtime and ctime were at least
``RACY_NS`` older than the moment its hashing began: on a file system with coarse timestamps a
rewrite within the same tick would otherwise keep every stat field (git's "racily clean" rule).
Not caught: contents changed behind the file system's back (a raw block write, a remote change
an NFS client has not revalidated yet); delete ``<cache_dir>/hashes`` to force a re-read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from typing import Callable, Optional

import datasets

from .build import Built, build_datasets
from .files import DataError, _has_rows, resolve_files
from .tokens import Work

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
# settings of DataConfig that change the rows (num_proc and cache_dir do not)
_SETTINGS = ("format", "max_length", "packing", "template", "text_field", "eval_fraction")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json")
_SPLITS = ("train", "eval", "eval_samples")
HASH_DIR = "hashes"   # under cache_dir: the data files' content hashes, reused while unchanged


def _hash_file(path: str, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)


def _files_of(spec) -> list[str]:
    """Every file a spec's rows come from (a saved datasets directory: every file inside it)."""
    out = []
    for f in resolve_files(spec):
        if os.path.isdir(f):
            out += sorted(os.path.join(d, n) for d, _, names in os.walk(f) for n in names)
        else:
            out.append(f)
    return out


RACY_NS = 2_000_000_000   # a hash taken less than this after the file's last change is not reused
_STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def content_hash(path: str, hash_dir: Optional[str] = None, pending: Optional[list] = None) -> str:
    """blake2b (16 bytes, hex) of the file's contents; with ``hash_dir``, reused from there while
    the file's size, mtime, ctime, inode and device are unchanged (see the module docstring).
    A new hash is kept in ``hash_dir`` at once, or appended to ``pending`` for ``keep_hashes``."""
    st = os.stat(path)
    now = [getattr(st, k) for k in _STAT_FIELDS]
    record = None
    if hash_dir is not None:
        name = hashlib.blake2b(os.path.abspath(path).encode(), digest_size=16).hexdigest() + ".json"
        record = os.path.join(hash_dir, name)
        try:
            with open(record) as f:
                old = json.load(f)
            if old["stat"] == now and max(st.st_mtime_ns, st.st_ctime_ns) < old["hashed_at_ns"] - RACY_NS:
                return old["blake2b"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    started = time.time_ns()
    h = hashlib.blake2b(digest_size=16)
    _hash_file(path, h)
    digest = h.hexdigest()
    after = [getattr(os.stat(path), k) for k in _STAT_FIELDS]
    if record is not None and after == now:    # changed while being read: keep no record
        entry = (record, {"path": os.path.abspath(path), "stat": now, "hashed_at_ns": started, "blake2b": digest})
        if pending is None:
            keep_hashes([entry])
        else:
            pending.append(entry)
    return digest


def keep_hashes(entries: list) -> None:
    """Write ``content_hash``'s pending records (best effort: a read-only cache directory only
    means the files are read again next time)."""
    for record, payload in entries:
        try:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            tmp = f"{record}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, record)
        except OSError as e:
            logger.debug("data cache: cannot keep the hash of %s: %s", payload["path"], e)


def files_fingerprint(spec, hash_dir: Optional[str] = None, pending: Optional[list] = None) -> list[dict]:
    """Path, size and content hash (blake2b) of each data file, in the pipeline's order; with
    ``hash_dir`` a file unchanged since its last hashing is not read again (``content_hash``)."""
    return [{"path": os.path.abspath(f), "size": os.path.getsize(f),
             "blake2b": content_hash(f, hash_dir, pending)} for f in _files_of(spec)]


def data_contents(cache_path: str) -> dict:
    """{"train": [...], "eval": [...] or None} of a built cache: each data file's path, size and
    content hash as the cache was keyed (read from its meta.json, no data file is read). What a
    checkpoint's fingerprint can hold to refuse a resume on changed data contents."""
    with open(os.path.join(cache_path, "meta.json")) as f:
        fp = json.load(f)["fingerprint"]
    return {"train": fp["train"], "eval": fp["eval"]}


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the token ids: the tokenizer's files, vocabulary, special tokens, chat template."""
    vocab = hashlib.blake2b(json.dumps(sorted(tokenizer.get_vocab().items())).encode(), digest_size=16)
    files = {}
    src = getattr(tokenizer, "name_or_path", "") or ""
    if os.path.isdir(src):
        for name in _TOKENIZER_FILES:
            path = os.path.join(src, name)
            if os.path.isfile(path):
                h = hashlib.blake2b(digest_size=16)
                _hash_file(path, h)
                files[name] = h.hexdigest()
    return {"class": type(tokenizer).__name__, "len": len(tokenizer), "vocab": vocab.hexdigest(), "files": files,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def fingerprint(cfg, tokenizer, hash_dir: Optional[str] = None, pending: Optional[list] = None,
                answer_format: str = "label") -> dict:
    """The full description the cache key hashes (also written to the cache's meta.json)."""
    settings = {k: getattr(cfg, k) for k in _SETTINGS}
    if answer_format != "label":      # only then: the keys of caches built before it stay valid
        settings["answer_format"] = answer_format
    return {"version": CACHE_VERSION,
            "settings": settings,
            "train": files_fingerprint(cfg.train, hash_dir, pending),
            "eval": files_fingerprint(cfg.eval, hash_dir, pending) if cfg.eval else None,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def cache_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


def _build(cfg, tokenizer, final: str, fp: dict, rank: int, answer_format: str) -> None:
    parent = os.path.dirname(final)
    created = []  # directories made here, removed again if the build fails (bad input leaves no trace)
    d = parent
    while not os.path.isdir(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    logger.info("data cache: building %s (rank %d)", final, rank)
    try:
        # the maps and the raw loader write arrow files under tmp, so the build need not fit in memory
        work = Work(num_proc=cfg.num_proc or 1, work_dir=os.path.join(tmp, "work"))
        os.makedirs(work.work_dir)
        built = build_datasets(cfg, tokenizer, cache_dir=os.path.join(tmp, "hf"), work=work,
                               answer_format=answer_format)
        for split in _SPLITS:
            ds = getattr(built, split)
            if ds is not None:
                ds.save_to_disk(os.path.join(tmp, split))
        del built, ds
        for scratch in ("work", "hf"):
            shutil.rmtree(os.path.join(tmp, scratch), ignore_errors=True)
        meta = {"fingerprint": fp, "built_by": {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()},
                "seconds": round(time.time() - t0, 3)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, final)  # atomic: the cache exists whole or not at all
        except OSError:
            if not os.path.isdir(final):
                raise
            logger.info("data cache: %s appeared meanwhile; keeping it", final)  # another builder won
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; stops at the first that is not empty
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("data cache: built %s in %.1f s", final, time.time() - t0)


def _check_same_files(cfg, fp: dict) -> None:
    """DataError unless this rank's data files are rank 0's by path and size (a ``stat`` each:
    the contents are rank 0's to hash). A rank whose config names other files than rank 0's
    would otherwise train on rank 0's rows without a word; its own unreadable file is named."""
    for split, spec in (("train", cfg.train), ("eval", cfg.eval)):
        theirs = [(f["path"], f["size"]) for f in fp[split] or []]
        mine = [(os.path.abspath(f), os.path.getsize(f)) for f in _files_of(spec)] if spec else []
        if mine != theirs:
            for f, _ in mine:
                _has_rows(f)
            show = lambda files: ", ".join(f"{p} ({n} bytes)" for p, n in files[:3]) or "none"  # noqa: E731
            raise DataError(f"data.{split}: this rank reads {show(mine)} where rank 0 reads {show(theirs)}: "
                            f"every rank must run the same config on the same files")


def load_cache(path: str) -> Built:
    """Memory-map a built cache directory."""
    parts = {s: datasets.load_from_disk(os.path.join(path, s)) if os.path.isdir(os.path.join(path, s)) else None
             for s in _SPLITS}
    return Built(train=parts["train"], eval=parts["eval"], eval_samples=parts["eval_samples"], cache_path=path,
                 built=False)


def load_or_build(cfg, tokenizer, cache_dir: str, *, rank: int = 0, local_rank: int = 0,
                  barrier: Optional[Callable[[], None]] = None,
                  broadcast: Optional[Callable[[object], object]] = None, answer_format: str = "label") -> Built:
    """The run's data sets, tokenized by one process per storage domain and memory-mapped by all.

    Collective: every rank calls it with the same ``cfg``/tokenizer and passes the same
    ``barrier`` (e.g. ``torch.distributed.barrier``; None for one process), which is called exactly
    twice on every rank, also when building fails, so no rank is left waiting: the failing rank
    raises its own error after the barriers, and a rank whose builder failed raises a DataError.
    The barrier must tolerate a long build (the process group's timeout bounds it).
    ``broadcast`` (rank 0's object in, rank 0's object out on every rank, e.g.
    ``distributed.broadcast_object``; None for one process) hands rank 0's cache key to the
    others after the first barrier: only rank 0 reads the data files to key the cache.
    ``answer_format`` as ``build.build_datasets`` takes it (part of the cache key).
    """
    barrier = barrier or (lambda: None)
    broadcast = broadcast or (lambda obj: obj)
    root = os.path.abspath(cache_dir)
    fp: Optional[dict] = None
    path = ""
    built_here = False
    error: Optional[BaseException] = None

    def attempt():
        nonlocal built_here, error
        if error is None and not os.path.isdir(path):
            try:
                _build(cfg, tokenizer, path, fp, rank, answer_format)
                built_here = True
            except Exception as e:  # re-raised after the barriers
                error = e

    if rank == 0:
        hashes: list = []
        try:
            fp = fingerprint(cfg, tokenizer, os.path.join(root, HASH_DIR), hashes, answer_format)
            path = os.path.join(root, cache_key(fp))
        except Exception as e:  # noqa: BLE001 - re-raised after the barriers, named to the others
            error = e
        attempt()
        if error is None:
            keep_hashes(hashes)   # only beside a cache: bad input leaves no directory behind
    barrier()
    fp, failed = broadcast((fp, None if error is None else f"rank 0: {error}") if rank == 0 else None)
    if fp is not None:
        path = os.path.join(root, cache_key(fp))
        if rank != 0:
            try:
                _check_same_files(cfg, fp)
            except Exception as e:  # noqa: BLE001 - re-raised after the barriers
                error = e
    elif error is None:
        error = DataError(f"data cache: the cache key was not computed ({failed})")
    if local_rank == 0:
        attempt()  # node-local storage: this node does not see rank 0's cache
    barrier()
    if error is not None:
        raise error
    if not os.path.isdir(path):
        # Name this rank's own bad file when it has one (e.g. a config that differs per rank),
        # else say the builder failed: its rank reports the cause.
        for spec in (cfg.train, cfg.eval):
            for f in resolve_files(spec) if spec else ():
                _has_rows(f)
        raise DataError(f"data cache {path} was not built: its builder (rank 0 or this node's local rank 0) failed")
    out = load_cache(path)
    out.built = built_here
    if not built_here:
        logger.info("data cache: using %s", path)
    return out
