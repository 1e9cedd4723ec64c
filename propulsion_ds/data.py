"""Data: files -> raw ``datasets.Dataset`` -> template -> tokenize -> pack/truncate -> batches.

Pipeline (``build_datasets``):

* ``resolve_files`` turns the config's ``train`` / ``eval`` spec (files, globs, a directory, or a
  directory written by ``Dataset.save_to_disk``) into a sorted list of files.
* ``load_raw`` loads them with ``datasets.load_dataset`` (local and offline). JSONL is checked line
  by line first, so a malformed line is reported as ``file:line`` instead of an arrow traceback.
  ``.txt`` files give one document per blank-line-separated paragraph, in a field named ``text``.
* Rows are tokenized with a batched ``Dataset.map`` into ``input_ids`` / ``labels`` (labels are
  -100 where masked; the model shifts them, so ``labels[i]`` is the target at position ``i``).

Batching is index arithmetic over the tokenized dataset: ``epoch_batches`` gives rank ``r`` its
micro-batches for one epoch (a seeded permutation, sharded so every rank gets the same number of
micro-batches), ``collate`` pads them. Resuming at step position ``p`` of an epoch is
``epoch_batches(..., start=p)``: no data is re-read or re-tokenized.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

import datasets

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet")
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# row status emitted by the tokenizing maps, counted and then dropped
_OK, _TRUNCATED, _DROPPED = 0, 1, 2

Spec = Union[str, Sequence[str]]


class DataError(ValueError):
    """Bad training data; the message is one line naming the file (and line for JSONL)."""


# --------------------------------------------------------------------------------------------
# files


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def _ext(path: str) -> str:
    low = path.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return os.path.splitext(low)[1]


def _as_list(spec: Spec) -> list[str]:
    if isinstance(spec, str):
        items = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        items = list(spec)
    else:
        raise DataError(f"data spec must be a path string or a list of them, got {spec!r}")
    if not items or any(not s.strip() for s in items):
        raise DataError(f"data spec {spec!r} is empty; set data.train to a file, glob or directory")
    return items


def describe(spec: Spec) -> str:
    """A short human name for a spec, used in error messages."""
    items = [spec] if isinstance(spec, str) else list(spec)
    return items[0] if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)"


def resolve_files(spec: Spec) -> list[str]:
    """Expand a spec (a path or list of paths: files, globs, directories) into data files.

    A directory written by ``Dataset.save_to_disk`` resolves to ``[that directory]`` and must be
    the only entry. Any other directory contributes the supported files under it (recursively,
    hidden files skipped). The result is de-duplicated and, per entry, sorted, so it is the same
    on every rank and every run.
    """
    out: list[str] = []
    for item in _as_list(spec):
        if _is_saved_dataset(item):
            if len(_as_list(spec)) != 1:
                raise DataError(f"{item}: a saved datasets directory must be the only entry in the data spec")
            return [item]
        if os.path.isdir(item):
            found = sorted(
                p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                if os.path.isfile(p) and _ext(p) in SUPPORTED_EXTENSIONS
                and not any(part.startswith(".") for part in os.path.relpath(p, item).split(os.sep))
            )
            if not found:
                raise DataError(f"{item}: directory holds no data files ({', '.join(SUPPORTED_EXTENSIONS)})")
            out.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{item}: glob matches no files")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    files = list(dict.fromkeys(out))
    for f in files:
        if _ext(f) not in SUPPORTED_EXTENSIONS:
            raise DataError(f"{f}: unsupported file type (use {', '.join(SUPPORTED_EXTENSIONS)})")
    builders = {_BUILDERS[_ext(f)] for f in files}
    if len(builders) > 1:
        raise DataError(f"{describe(spec)}: mixes file types ({', '.join(sorted(builders))}); use one kind per data set")
    return files


def _check_jsonl(path: str) -> bool:
    """Raise DataError on the first malformed line; return whether the file has any row."""
    rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows += 1
    return rows > 0


def _check_json(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        # the json builder also accepts JSON Lines in a .json file
        return _check_jsonl(path)
    return True


def _has_rows(path: str) -> bool:
    """Validate a file before loading it; False when it holds no rows at all."""
    ext = _ext(path)
    try:
        if ext == ".jsonl":
            return _check_jsonl(path)
        if ext == ".json":
            return _check_json(path)
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                return any(line.strip() for line in f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return os.path.getsize(path) > 0


def load_raw(spec: Spec, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load a spec into one raw ``datasets.Dataset`` (local files only, never the network).

    ``.jsonl``/``.json`` -> the ``json`` builder, ``.txt`` -> ``text`` (one row per paragraph,
    field ``text``), ``.parquet`` -> ``parquet``; a saved directory -> ``load_from_disk`` (a
    ``DatasetDict`` must have a ``train`` split or exactly one split). Files without rows are
    skipped with a warning; no rows at all is a DataError naming the spec.
    """
    files = resolve_files(spec)
    name = describe(spec)
    if len(files) == 1 and _is_saved_dataset(files[0]):
        loaded = datasets.load_from_disk(files[0])
        if isinstance(loaded, datasets.DatasetDict):
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise DataError(f"{files[0]}: saved DatasetDict has splits {sorted(loaded)}; expected 'train' or exactly one")
        if len(loaded) == 0:
            raise DataError(f"{name}: empty data set (no rows)")
        return loaded

    nonempty = []
    for f in files:
        if _has_rows(f):
            nonempty.append(f)
        else:
            logger.warning("%s: no rows, skipped", f)
    if not nonempty:
        raise DataError(f"{name}: empty data set (no rows)")
    builder = _BUILDERS[_ext(nonempty[0])]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=nonempty, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # arrow/schema errors arrive as many types; report them as one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{name}: could not load as {builder} ({msg})") from e
    if len(ds) == 0:
        raise DataError(f"{name}: empty data set (no rows)")
    logger.info("loaded %d rows from %d file(s): %s", len(ds), len(nonempty), name)
    return ds


# --------------------------------------------------------------------------------------------
# tokenizing


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Every token id the tokenizer can produce must index the model's embedding."""
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(
            f"tokenizer has {n} tokens but the model's vocabulary has {vocab_size}; "
            "use the model's own tokenizer (tokenizer.name_or_path)"
        )


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (pads are masked anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], int]:
    """Right-truncate to max_length; status says whether it was cut or has no target left."""
    status = _OK
    if len(ids) > max_length:
        ids, labels, status = ids[:max_length], labels[:max_length], _TRUNCATED
    if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels):
        status = _DROPPED
    return ids, labels, status


def _require_columns(ds: datasets.Dataset, columns: Sequence[str], name: str, fmt: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{name}: no field {missing[0]!r} required by format {fmt!r} "
            f"(fields: {', '.join(ds.column_names) or 'none'})"
        )


def _finish(ds: datasets.Dataset, name: str, max_length: int, what: str) -> datasets.Dataset:
    """Count and log truncated/dropped rows, drop the dropped ones, keep input_ids/labels."""
    status = np.asarray(ds.with_format("numpy")["_status"]) if len(ds) else np.zeros(0, dtype=np.int64)
    n, truncated, dropped = len(ds), int((status == _TRUNCATED).sum()), int((status == _DROPPED).sum())
    if n and dropped == n:
        raise DataError(
            f"every sample in {name} is longer than max_length={max_length} (no target token left "
            f"after truncation); raise data.max_length or shorten the {what}"
        )
    if truncated:
        logger.warning("%s: %d of %d samples longer than max_length=%d, truncated from the right and kept",
                       name, truncated, n, max_length)
    if dropped:
        logger.warning("%s: %d of %d samples dropped: no target token within max_length=%d",
                       name, dropped, n, max_length)
    if dropped:
        ds = ds.filter(lambda s: [x != _DROPPED for x in s], input_columns="_status",
                       batched=True, keep_in_memory=True)
    return ds.remove_columns("_status")


def _map(ds: datasets.Dataset, fn, desc: str) -> datasets.Dataset:
    # keep_in_memory: no cache files to go stale or race on between ranks; every rank builds the
    # same rows deterministically from the same files
    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names,
                  keep_in_memory=True, load_from_cache_file=False, desc=desc)


def _tokenize_text(raw, field, tokenizer, max_length, packing, name):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])

    def fn(batch, idx):
        texts = batch[field]
        for t, i in zip(texts, idx):
            if not isinstance(t, str):
                raise DataError(f"{name}: row {i + 1}: field {field!r} is {type(t).__name__}, expected a string")
        ids = [head + x + tail for x in _encode(tokenizer, texts)]
        if packing:
            return {"input_ids": ids}
        out = {"input_ids": [], "labels": [], "_status": []}
        for x in ids:
            x, _, st = _fit(x, x, max_length)
            out["input_ids"].append(x)
            out["labels"].append(x)
            out["_status"].append(st)
        return out

    tok = _map(raw.select_columns([field]), fn, "tokenize text")
    if not packing:
        return _finish(tok, name, max_length, "documents")

    # pack: concatenate every document (BOS ... EOS) and cut exact max_length blocks, in arrow
    flat = tok.data.column("input_ids").combine_chunks().flatten()
    n_blocks = len(flat) // max_length
    if n_blocks == 0:
        raise DataError(f"{name}: {len(flat)} tokens in all, fewer than max_length={max_length}; nothing to pack")
    dropped = len(flat) - n_blocks * max_length
    values = flat.slice(0, n_blocks * max_length).cast(pa.int64())
    big = n_blocks * max_length >= 2**31
    offsets = pa.array(np.arange(0, n_blocks * max_length + 1, max_length, dtype=np.int64 if big else np.int32))
    blocks = (pa.LargeListArray if big else pa.ListArray).from_arrays(offsets, values)
    logger.info("%s: packed %d documents, %d tokens into %d blocks of %d (last %d tokens dropped)",
                name, len(tok), len(flat), n_blocks, max_length, dropped)
    return datasets.Dataset(pa.table({"input_ids": blocks, "labels": blocks}))


def _tokenize_instruction(raw, tokenizer, max_length, template, name):
    _require_columns(raw, ["instruction", "output"], name, "instruction")
    has_input = "input" in raw.column_names
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])

    def prompt_of(instruction, inp, i):
        try:
            if template is not None:
                return template.format(instruction=instruction, input=inp)
            return (ALPACA_TEMPLATE if inp else ALPACA_TEMPLATE_NO_INPUT).format(instruction=instruction, input=inp)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"data.template: cannot format row {i + 1} of {name} ({type(e).__name__}: {e}); "
                            "use only {instruction} and {input}") from None

    def fn(batch, idx):
        prompts, fulls = [], []
        for j, i in enumerate(idx):
            instruction, output = batch["instruction"][j], batch["output"][j]
            inp = batch["input"][j] if has_input else ""
            inp = "" if inp is None else inp
            for key, v in (("instruction", instruction), ("output", output), ("input", inp)):
                if not isinstance(v, str):
                    raise DataError(f"{name}: row {i + 1}: field {key!r} is "
                                    f"{'missing' if v is None else type(v).__name__}, expected a string")
            p = prompt_of(instruction, inp, i)
            prompts.append(p)
            fulls.append(p + output)
        out = {"input_ids": [], "labels": [], "_status": []}
        # tokenize prompt+output together (as at inference, where the model continues the prompt)
        # and mask the tokens shared with the prompt alone
        for p_ids, f_ids in zip(_encode(tokenizer, prompts), _encode(tokenizer, fulls)):
            n_prompt = len(head) + _common_prefix(p_ids, f_ids)
            ids = head + f_ids + tail
            labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            ids, labels, st = _fit(ids, labels, max_length)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_status"].append(st)
        return out

    cols = ["instruction", "output"] + (["input"] if has_input else [])
    return _finish(_map(raw.select_columns(cols), fn, "tokenize instructions"), name, max_length, "samples")


def _tokenize_chat(raw, tokenizer, max_length, name):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{name}: format 'chat' needs a tokenizer with a chat template, and "
                        f"{getattr(tokenizer, 'name_or_path', 'this tokenizer') or 'this tokenizer'} has none; "
                        "use format 'instruction' or a tokenizer that has one")
    _require_columns(raw, ["messages"], name, "chat")

    def render(msgs, generation_prompt, i):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:
            raise DataError(f"{name}: row {i + 1}: chat template failed "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    def fn(batch, idx):
        out = {"input_ids": [], "labels": [], "_status": []}
        for msgs, i in zip(batch["messages"], idx):
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise DataError(f"{name}: row {i + 1}: 'messages' must be a non-empty list of "
                                "{role, content} strings")
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            # the template decides BOS/EOS itself, as apply_chat_template(tokenize=True) does
            full = _encode(tokenizer, [render(msgs, False, i)])[0]
            labels = [IGNORE_INDEX] * len(full)
            for k, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                if k:
                    start_text = render(msgs[:k], True, i)
                else:  # the conversation opens with the assistant: skip the template's turn header
                    start_text = render([{"role": "assistant", "content": ""}], False, i)
                start = _common_prefix(_encode(tokenizer, [start_text])[0], full)
                end = _common_prefix(_encode(tokenizer, [render(msgs[:k + 1], False, i)])[0], full)
                labels[start:end] = full[start:end]
            ids, labels, st = _fit(full, labels, max_length)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_status"].append(st)
        return out

    return _finish(_map(raw.select_columns(["messages"]), fn, "tokenize chats"), name, max_length, "conversations")


def tokenize(raw: datasets.Dataset, cfg, tokenizer, name: str, from_text_files: bool = False) -> datasets.Dataset:
    """Tokenize one raw data set per ``cfg`` (a DataConfig) into input_ids/labels rows."""
    if cfg.max_length < 2:
        raise DataError(f"data.max_length must be >= 2, got {cfg.max_length}")
    if cfg.format == "text":
        field = "text" if from_text_files else cfg.text_field
        _require_columns(raw, [field], name, "text")
        return _tokenize_text(raw, field, tokenizer, cfg.max_length, cfg.packing, name)
    if cfg.format == "instruction":
        return _tokenize_instruction(raw, tokenizer, cfg.max_length, cfg.template, name)
    if cfg.format == "chat":
        return _tokenize_chat(raw, tokenizer, cfg.max_length, name)
    raise DataError(f"data.format must be text, instruction or chat, got {cfg.format!r}")


def _from_text_files(spec: Spec) -> bool:
    files = resolve_files(spec)
    return bool(files) and _ext(files[0]) == ".txt"


def build_datasets(cfg, tokenizer, seed: int = 0,
                   cache_dir: Optional[str] = None) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Load, template and tokenize train (and eval) data per ``cfg`` (a ``DataConfig``).

    Returns ``(train, eval_or_None)``, each with columns ``input_ids`` and ``labels`` (lists of
    ints, 2 <= length <= max_length, labels -100 where masked). Eval comes from ``cfg.eval`` when
    set, else the last ``eval_fraction`` of the raw train rows (file order, before any shuffle),
    else None. The result is a pure function of the files, the tokenizer and ``cfg``; ``seed`` is
    accepted for interface stability but nothing here is random (shuffling is per epoch, in
    ``epoch_batches``). ``cache_dir`` is passed to ``datasets.load_dataset`` (None: HF default).
    """
    del seed
    train_name = describe(cfg.train) if cfg.train else "data.train"
    raw = load_raw(cfg.train, cache_dir=cache_dir)
    txt = _from_text_files(cfg.train)
    raw_eval, eval_name, eval_txt = None, None, False
    if cfg.eval:
        raw_eval, eval_name, eval_txt = load_raw(cfg.eval, cache_dir=cache_dir), describe(cfg.eval), _from_text_files(cfg.eval)
    elif cfg.eval_fraction:
        if not 0.0 < cfg.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
        n = len(raw)
        n_eval = max(1, int(round(n * cfg.eval_fraction)))
        if n_eval >= n:
            raise DataError(f"{train_name}: {n} rows are too few to carve eval_fraction={cfg.eval_fraction} from")
        raw, raw_eval = raw.select(range(n - n_eval)), raw.select(range(n - n_eval, n))
        eval_name, eval_txt = f"{train_name} [last {n_eval} of {n} rows]", txt
        logger.info("eval: last %d of %d rows of %s", n_eval, n, train_name)
    train = tokenize(raw, cfg, tokenizer, train_name, txt)
    ev = tokenize(raw_eval, cfg, tokenizer, eval_name, eval_txt) if raw_eval is not None else None
    logger.info("train: %d rows%s", len(train), f"; eval: {len(ev)} rows" if ev is not None else "")
    return train, ev


# --------------------------------------------------------------------------------------------
# batching


def batches_per_epoch(n_rows: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank runs per epoch (the uneven tail of the permutation is dropped)."""
    if micro_batch_size < 1 or world_size < 1:
        raise ValueError(f"micro_batch_size and world_size must be >= 1, got {micro_batch_size}, {world_size}")
    return n_rows // (micro_batch_size * world_size)


def epoch_permutation(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The epoch's row order: ``torch.randperm`` seeded with ``seed + epoch`` (CPU generator)."""
    if not shuffle:
        return torch.arange(n_rows)
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    return torch.randperm(n_rows, generator=g)


def epoch_batches(n_rows: Union[int, Sequence], micro_batch_size: int, rank: int, world_size: int,
                  seed: int, epoch: int, shuffle: bool = True, start: int = 0) -> list[list[int]]:
    """Row indices of rank ``rank``'s micro-batches for ``epoch``, from position ``start`` on.

    Step position ``p`` (0-based, counted in micro-batches) uses permutation slice
    ``[p*M*W, (p+1)*M*W)`` (M = micro_batch_size, W = world_size) and rank ``r`` takes the r-th
    M-sized chunk of it, so ranks are disjoint, all have ``batches_per_epoch`` batches, and
    ``epoch_batches(..., start=p) == epoch_batches(...)[p:]``. ``n_rows`` may be a dataset.
    """
    n = len(n_rows) if hasattr(n_rows, "__len__") else int(n_rows)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    n_batches = batches_per_epoch(n, micro_batch_size, world_size)
    if n_batches == 0:
        raise DataError(f"data set has {n} rows, fewer than micro_batch_size*world_size="
                        f"{micro_batch_size * world_size}: no full batch")
    if not 0 <= start <= n_batches:
        raise ValueError(f"start={start} is outside the epoch's {n_batches} micro-batches")
    glob_b = micro_batch_size * world_size
    perm = epoch_permutation(n, seed, epoch, shuffle)[start * glob_b: n_batches * glob_b]
    mine = perm.view(-1, world_size, micro_batch_size)[:, rank, :]
    return mine.tolist()


def collate(rows: Union[Sequence[dict], dict], pad_id: int, max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad rows (dicts with input_ids/labels, or one dict of lists) into LongTensors.

    Pads get ``pad_id`` in input_ids, 0 in attention_mask and -100 in labels. With
    ``max_length`` every batch is padded to exactly that length (static shapes).
    """
    if isinstance(rows, dict):
        ids_list, lab_list = list(rows["input_ids"]), list(rows["labels"])
    else:
        ids_list, lab_list = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    if not ids_list:
        raise ValueError("collate got no rows")
    longest = max(len(x) for x in ids_list)
    width = longest if max_length is None else max_length
    if longest > width:
        raise ValueError(f"a row has {longest} tokens, more than max_length={max_length}")
    b = len(ids_list)
    input_ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids_list, lab_list)):
        if len(x) != len(y):
            raise ValueError(f"row {i}: {len(x)} input_ids but {len(y)} labels")
        input_ids[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        labels[i, :len(y)] = torch.as_tensor(y, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def get_batch(ds: datasets.Dataset, indices: Sequence[int], pad_id: int,
              max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Fetch rows ``indices`` of a tokenized dataset and collate them."""
    return collate(ds[list(indices)], pad_id, max_length)
