"""Tokenizing: raw rows -> template -> token ids and labels, one sample per row.

Every format gives ``input_ids`` / ``labels`` (labels are -100 where masked; the model shifts
them, so ``labels[i]`` is the target at position ``i``). Instruction and chat samples longer than
``max_length`` are truncated from the right (dropped when no target is left); text documents are
kept whole when packing (``pack.py`` cuts them into ``max_length`` pieces) and truncated otherwise.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

import datasets

from .choices import text_format_row
from .files import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

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


@dataclass
class Work:
    """How the maps run: ``num_proc`` tokenizer processes; with ``work_dir`` the maps write arrow
    files there (a cache build, so the rows need not fit in memory), else they stay in memory."""
    num_proc: int = 1
    work_dir: Optional[str] = None

    def map_kwargs(self, desc: str) -> dict:
        kw: dict = {"load_from_cache_file": False, "desc": desc}
        if self.num_proc > 1:
            kw["num_proc"] = self.num_proc
        if self.work_dir:
            kw["cache_file_name"] = os.path.join(self.work_dir, f"{desc.replace(' ', '_')}-{uuid.uuid4().hex}.arrow")
        else:
            # no cache files to go stale or race on between ranks: every rank that builds in
            # memory builds the same rows deterministically from the same files
            kw["keep_in_memory"] = True
        return kw


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


def _finish(ds: datasets.Dataset, name: str, max_length: int, what: str, work: Work) -> datasets.Dataset:
    """Count and log truncated/dropped rows, drop the dropped ones, keep input_ids/labels."""
    status = ds.data.column("_status").to_numpy() if len(ds) else np.zeros(0, dtype=np.int64)
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
        ds = ds.select(np.flatnonzero(status != _DROPPED)).flatten_indices(**_flat_kwargs(work))
    return ds.remove_columns("_status")


def _flat_kwargs(work: Work) -> dict:
    if work.work_dir:
        return {"cache_file_name": os.path.join(work.work_dir, f"select-{uuid.uuid4().hex}.arrow")}
    return {"keep_in_memory": True}


def _map(ds: datasets.Dataset, fn, desc: str, work: Work) -> datasets.Dataset:
    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, **work.map_kwargs(desc))


def _tokenize_text(raw, field, tokenizer, max_length, packing, name, work):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])

    def fn(batch, idx):
        texts = batch[field]
        for t, i in zip(texts, idx):
            if not isinstance(t, str):
                raise DataError(f"{name}: row {i + 1}: field {field!r} is {type(t).__name__}, expected a string")
        out = {"input_ids": [], "labels": [], "_status": []}
        for x in _encode(tokenizer, texts):
            x = head + x + tail
            # packing keeps the whole document: pack.py cuts it into max_length pieces
            x, _, st = (x, x, _OK if len(x) >= 2 else _DROPPED) if packing else _fit(x, x, max_length)
            out["input_ids"].append(x)
            out["labels"].append(x)
            out["_status"].append(st)
        return out

    tok = _map(raw.select_columns([field]), fn, "tokenize text", work)
    return _finish(tok, name, max_length, "documents", work)


def render_prompt(instruction: str, input: str, template: Optional[str], where: str = "a row") -> str:
    """The prompt an instruction row is trained on: ``template`` (None: Alpaca, with or without
    the input section) formatted with the row's instruction and input; the target follows it."""
    try:
        if template is not None:
            return template.format(instruction=instruction, input=input)
        return (ALPACA_TEMPLATE if input else ALPACA_TEMPLATE_NO_INPUT).format(instruction=instruction, input=input)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"data.template: cannot format {where} ({type(e).__name__}: {e}); "
                        "use only {instruction} and {input}") from None


def _tokenize_instruction(raw, tokenizer, max_length, template, name, work, answer_format="label"):
    _require_columns(raw, ["instruction", "output"], name, "instruction")
    has_input = "input" in raw.column_names
    # answer_format "text": a row with an `answer` label is trained to name the gold option's text,
    # as the multiple-choice scorer's text format scores it (docs/EVAL.md)
    rewrite = answer_format == "text" and "answer" in raw.column_names
    has_choices = "choices" in raw.column_names
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])

    def prompt_of(instruction, inp, i):
        return render_prompt(instruction, inp, template, where=f"row {i + 1} of {name}")

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
            if rewrite:
                row = {"instruction": instruction, "output": output, "answer": batch["answer"][j],
                       "choices": batch["choices"][j] if has_choices else None}
                output = text_format_row(row, where=f"{name}: row {i + 1}")["output"]
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

    cols = (["instruction", "output"] + (["input"] if has_input else [])
            + (["answer"] + (["choices"] if has_choices else []) if rewrite else []))
    return _finish(_map(raw.select_columns(cols), fn, "tokenize instructions", work), name, max_length, "samples", work)


def _tokenize_chat(raw, tokenizer, max_length, name, work):
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

    return _finish(_map(raw.select_columns(["messages"]), fn, "tokenize chats", work), name, max_length, "conversations", work)


def tokenize(raw: datasets.Dataset, cfg, tokenizer, name: str, from_text_files: bool = False,
             work: Optional[Work] = None, answer_format: str = "label") -> datasets.Dataset:
    """Tokenize one raw data set per ``cfg`` (a DataConfig) into input_ids/labels samples.
    ``answer_format``: "text" rewrites instruction rows that carry an ``answer`` label to name the
    gold option's text (``choices.text_format_row``); "label" keeps ``output`` as written."""
    work = work or Work()
    if cfg.max_length < 2:
        raise DataError(f"data.max_length must be >= 2, got {cfg.max_length}")
    if cfg.format == "text":
        field = "text" if from_text_files else cfg.text_field
        _require_columns(raw, [field], name, "text")
        return _tokenize_text(raw, field, tokenizer, cfg.max_length, cfg.packing, name, work)
    if cfg.format == "instruction":
        return _tokenize_instruction(raw, tokenizer, cfg.max_length, cfg.template, name, work, answer_format)
    if cfg.format == "chat":
        return _tokenize_chat(raw, tokenizer, cfg.max_length, name, work)
    raise DataError(f"data.format must be text, instruction or chat, got {cfg.format!r}")
