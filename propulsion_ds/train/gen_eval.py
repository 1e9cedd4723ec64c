"""Task accuracy during training: greedy generation on eval rows, scored against their answers.

The paper reports accuracy (GSM8K and other reasoning tasks), not loss. ``generation_eval`` takes
the first ``eval.generate_samples`` tokenized eval rows, generates greedily from each row's prompt
and compares the text with the row's target text:

* ``metric="marker"``: the text after the last ``answer_marker`` (GSM8K's ``#### 72``), first line,
  stripped; numbers are normalised (``1,000.`` == ``1000``).
* ``metric="exact"``: the whole answer, stripped.
* ``metric="none"``: accuracy is None; the samples are only logged.

ZeRO-3 on several ranks: every forward gathers each module's parameters with a collective, so a
rank that stops generating while another still runs would leave that rank waiting in a gather
forever. Two rules keep every rank in step: (1) every rank makes the same number of ``generate``
calls (a short shard is padded with a repeated row that is not counted), and (2) inside a call,
``synced_gpus=True`` keeps a rank whose sequences have all ended running forward passes until
every rank's have. The counts are then summed over ranks with one all-reduce.

Used from ``Trainer.evaluate`` (one call each):
``result = generation_eval(...)``, ``record.update(log_generation(writer, result, step))``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from propulsion_ds.data import IGNORE_INDEX
from propulsion_ds.errors import StopDuringEval

METRICS = ("marker", "exact", "none")
N_EXAMPLES = 4            # prompt / reference / generation triples kept for the logs
# Prompts per generate call, left-padded. Under ZeRO-3 every forward gathers every weight, so fewer,
# wider calls win: 2 ranks, CPU, stories260K partitioned, 16 GSM8K prompts x 32 new tokens took
# 54.8 s one prompt at a time, 14.9 s in batches of 4, 8.7 s in batches of 8 (one call per rank).
# Left padding gave the same tokens as unpadded prompts on every row checked (tests).
DEFAULT_BATCH_SIZE = 16


@dataclass
class GenSample:
    """One eval row split for generation: the prompt's token ids and the reference answer text."""
    prompt_ids: list
    reference: str


# ----------------------------------------------------------------------------- splitting rows

def split_sample(input_ids: Sequence[int], labels: Sequence[int], tokenizer) -> GenSample:
    """Prompt = every token before the first target; reference = the first run of targets, decoded.

    HF convention: ``labels`` is aligned with ``input_ids`` (the model shifts), -100 where masked.
    ``labels[0]`` is never predicted by the shifted loss, so the search starts at position 1: a
    text row (labels == input_ids) gives the BOS token as prompt and the document as reference.
    Only the first contiguous run of targets is the reference: in a multi-turn chat the later
    assistant turns follow user turns the model does not see when it continues this prompt.
    Special tokens (EOS, a chat template's end-of-turn) are dropped from the text.
    """
    ids, labs = list(input_ids), list(labels)
    if len(ids) != len(labs):
        raise ValueError(f"a row has {len(ids)} input_ids but {len(labs)} labels")
    start = next((i for i in range(1, len(labs)) if labs[i] != IGNORE_INDEX), None)
    if start is None:
        raise ValueError("a row has no target token (labels are all -100 after position 0)")
    end = next((i for i in range(start, len(labs)) if labs[i] == IGNORE_INDEX), len(labs))
    reference = tokenizer.decode(ids[start:end], skip_special_tokens=True)
    return GenSample(prompt_ids=ids[:start], reference=reference)


def split_samples(samples, tokenizer, limit: Optional[int] = None) -> list:
    """``split_sample`` for the first ``limit`` rows (all when None) of a Dataset or list of dicts."""
    n = len(samples) if limit is None else min(int(limit), len(samples))
    if hasattr(samples, "select"):                       # datasets.Dataset: read only what is used
        rows = samples.select(range(n)).select_columns(["input_ids", "labels"]).to_list()
    else:
        rows = list(samples)[:n]
    return [split_sample(r["input_ids"], r["labels"], tokenizer) for r in rows]


# ----------------------------------------------------------------------------- metrics

_NUMBER = re.compile(r"[-+]?\$?\s*[\d,]*\.?\d+\.?")


def normalise_answer(text: str) -> str:
    """Strip; a GSM8K-style number loses thousands commas, a leading ``$`` and a trailing ``.``."""
    s = text.strip()
    if _NUMBER.fullmatch(s):
        s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
        if s.startswith("+"):
            s = s[1:]
    return s


def marker_answer(text: str, marker: str) -> Optional[str]:
    """The normalised first line after the LAST ``marker`` in ``text``; None when it is absent.

    First line: a model that writes ``#### 72`` and then starts another problem is scored on 72.
    """
    if not marker:
        raise ValueError("eval.answer_marker is empty: set it to the marker before the answer (e.g. '####')")
    at = text.rfind(marker)
    if at < 0:
        return None
    rest = text[at + len(marker):].strip()
    return normalise_answer(rest.splitlines()[0] if rest else "")


def is_correct(generation: str, reference: str, metric: str, marker: str = "####") -> Optional[bool]:
    """Whether ``generation`` answers like ``reference`` under ``metric``; None for metric "none".

    "marker": the answers after the marker must both exist and be equal (a reference without the
    marker can never be matched, so such data scores 0, visibly). "exact": stripped texts equal.
    """
    if metric == "none":
        return None
    if metric == "exact":
        return generation.strip() == reference.strip()
    if metric == "marker":
        want = marker_answer(reference, marker)
        return want is not None and marker_answer(generation, marker) == want
    raise ValueError(f"eval.metric must be one of {', '.join(METRICS)}, got {metric!r}")


# ----------------------------------------------------------------------------- sharding

def shard_indices(n: int, rank: int, world_size: int) -> list:
    """This rank's sample indices, strided, padded to ceil(n / world) entries.

    Returns [(index, counted)]. Every rank gets the same number of entries so every rank makes
    the same number of generate calls (ZeRO-3: each call's forwards are collectives). A padding
    entry repeats a real row (the rank's first, or row 0 when the rank has none) and is not counted.
    """
    per_rank = math.ceil(n / world_size) if n else 0
    mine = [(i, True) for i in range(rank, n, world_size)]
    filler = mine[0][0] if mine else 0
    return mine + [(filler, False)] * (per_rank - len(mine))


def _left_pad(prompts: list, pad_id: int, device) -> tuple:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer, model) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return 0


# ----------------------------------------------------------------------------- generation

def generate_batch(model, prompts: list, *, max_new_tokens: int, pad_id: int, device,
                   synced_gpus: bool) -> list:
    """Greedy continuations (new token ids, as lists) of ``prompts``, left-padded into one batch.

    ``use_cache=True`` explicitly: the trainer sets ``config.use_cache=False`` for training (the
    packed-sequence detection needs no cache), and without a cache every new token re-runs the
    whole sequence. The attention mask goes in and no position_ids: generate derives positions
    from the mask (left pads do not shift them), and with a mask and a cache transformers'
    packed-sequence detection is off.
    """
    ids, mask = _left_pad(prompts, pad_id, device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         synced_gpus=synced_gpus, pad_token_id=pad_id, use_cache=True,
                         temperature=None, top_p=None, top_k=None)
    new = out[:, ids.shape[1]:].tolist()
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    trimmed = []
    for seq in new:   # a row that ended early is filled with pads: cut after its first EOS
        cut = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
        trimmed.append(seq[:cut])
    return trimmed


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE,
                   device=None, synced_gpus: bool = False, should_stop=None) -> list:
    """Greedy continuations of ``prompts`` (lists of token ids) as text, special tokens dropped.

    Batches of ``batch_size`` in order, so ranks with equally long prompt lists make equally many
    generate calls. The model runs in eval mode; its previous mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    was_training = model.training
    model.eval()
    texts = []
    try:
        for lo in range(0, len(prompts), batch_size):
            if should_stop is not None and should_stop():   # collective: as many calls on every rank
                raise StopDuringEval("stop requested during generation")
            outs = generate_batch(model, prompts[lo:lo + batch_size], max_new_tokens=max_new_tokens,
                                  pad_id=pad_id, device=device, synced_gpus=synced_gpus)
            texts.extend(tokenizer.decode(ids, skip_special_tokens=True) for ids in outs)
    finally:
        model.train(was_training)
    return texts


def _all_reduce_sum(values: list) -> list:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def _gather_examples(examples: list, world_size: int) -> list:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * world_size
        torch.distributed.all_gather_object(out, examples)
        examples = [e for part in out for e in part]
    return [e[1:] for e in sorted(examples)[:N_EXAMPLES]]


@torch.no_grad()
def generation_eval(model, tokenizer, samples, cfg_eval, *, rank: int = 0, world_size: int = 1,
                    device=None, zero3: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                    should_stop=None) -> dict:
    """Greedy generation on the first ``cfg_eval.generate_samples`` rows, scored by ``cfg_eval.metric``.

    Collective when ``world_size > 1``: call it on every rank. ``model`` is the module with
    Propulsion's hooks (the DeepSpeed engine's ``.module``); it runs in eval mode and its previous
    mode is restored. ``should_stop`` (collective, e.g. ``StopRequest.agreed``) is asked before
    each generate call; when true, StopDuringEval is raised. Returns the same dict on every rank::

        {"accuracy": correct / n or None, "correct": int, "n": int,
         "examples": [(prompt, reference, generation), ...]}   # the first N_EXAMPLES rows
    """
    metric, marker = cfg_eval.metric, cfg_eval.answer_marker
    if metric not in METRICS:
        raise ValueError(f"eval.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    gen_samples = split_samples(samples, tokenizer, cfg_eval.generate_samples)
    plan = shard_indices(len(gen_samples), rank, world_size)
    texts = generate_texts(model, tokenizer, [gen_samples[i].prompt_ids for i, _ in plan],
                           max_new_tokens=cfg_eval.max_new_tokens, batch_size=batch_size, device=device,
                           synced_gpus=bool(zero3 and world_size > 1), should_stop=should_stop)
    correct = counted = 0
    examples = []
    for (i, count), text in zip(plan, texts):
        if not count:                      # shard padding: generated only to keep ranks in step
            continue
        s = gen_samples[i]
        counted += 1
        correct += bool(is_correct(text, s.reference, metric, marker))
        if len(examples) < N_EXAMPLES:
            examples.append((i, tokenizer.decode(s.prompt_ids, skip_special_tokens=True), s.reference, text))
    correct, counted = (int(round(v)) for v in _all_reduce_sum([float(correct), float(counted)]))
    accuracy = None if metric == "none" or counted == 0 else correct / counted
    return {"accuracy": accuracy, "correct": correct, "n": counted,
            "examples": _gather_examples(examples, world_size)}


# ----------------------------------------------------------------------------- logging

def generation_record(result: dict) -> dict:
    """The metrics.jsonl fields of a ``generation_eval`` result."""
    return {"eval_accuracy": result["accuracy"], "eval_correct": result["correct"],
            "eval_generated": result["n"]}


def examples_markdown(examples: list) -> str:
    """The triples as TensorBoard text (markdown): each field in a code block, so it shows verbatim."""
    parts = []
    for k, (prompt, reference, generation) in enumerate(examples):
        parts.append(f"**sample {k}**\n\nprompt:\n\n{_block(prompt)}\n\nreference:\n\n{_block(reference)}"
                     f"\n\ngeneration:\n\n{_block(generation)}")
    return "\n\n---\n\n".join(parts)


def _block(text: str) -> str:
    # TensorBoard renders markdown: indent every line by 4 spaces for a verbatim block.
    return "\n".join("    " + line for line in (text or "(empty)").splitlines() or ["(empty)"])


def write_tensorboard(writer, result: dict, step: int) -> None:
    if result["accuracy"] is not None:
        writer.add_scalar("eval/accuracy", result["accuracy"], step)
    if result["examples"]:
        writer.add_text("eval/generations", examples_markdown(result["examples"]), step)


def log_generation(writer, result: dict, step: int, run=None) -> dict:
    """Write ``eval/accuracy`` and the example triples to ``writer`` (skipped when None); return
    the metrics.jsonl fields. ``run(fn)`` runs the write (the engine passes its rank-0 I/O guard,
    which turns a failed write into its own error path); default: call it directly."""
    if writer is not None:
        fn = lambda: write_tensorboard(writer, result, step)  # noqa: E731
        run(fn) if run is not None else fn()
    return generation_record(result)
