"""Multiple-choice accuracy: each candidate completion, after the prompt rendered exactly as in
training, is scored by the model's log-likelihood of its tokens; the best-scoring one is the pick.

Rows are instruction rows with an ``answer`` label. The candidates are the labels listed after
"Answer format:" in the instruction (or an explicit ``choices`` list); a label's option text is
what follows "<Label>:" in the instruction. Two answer formats:

- ``label``: the completion is the row's ``output`` with the gold label replaced by the candidate
  ("the correct answer is answer3"); score = summed log-likelihood of its tokens.
- ``text``: the completion names the option's text ("the correct answer is <option text>");
  score = mean log-likelihood per token (options differ in length).

Ties go to the lowest index. The completion tokens are exactly the tokens training puts a loss
on (prompt and prompt+completion tokenized, the common prefix masked), except the EOS training
appends: it is not scored, so that the score is that of the completion text alone, which is also
what lm-evaluation-harness scores (docs/EVAL.md).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from propulsion_ds.data.choices import ANSWER_FORMATS, TEXT_PREFIX, gold_index, parse_choices, row_where
from propulsion_ds.data.tokens import render_prompt
from propulsion_ds.errors import DataError


@dataclass
class ChoiceQuestion:
    """One question: the rendered prompt, the candidate completions, the gold index, its file stem."""
    prompt: str
    completions: list[str]
    answer: int
    source: str


def _label_completions(row: dict, labels: Sequence[str], gold: int, where: str) -> list[str]:
    out = row.get("output")
    if not isinstance(out, str):
        raise DataError(f"{where}: field 'output' is {type(out).__name__}, expected a string")
    g = labels[gold]
    i = out.rfind(g)
    if i < 0:
        i = out.lower().rfind(g.lower())
    if i < 0:
        raise DataError(f"{where}: output {out[:80]!r} does not contain the answer {g!r}")
    return [out[:i] + lab + out[i + len(g):] for lab in labels]


def build_questions(rows, template: Optional[str], answer_format: str, source: str) -> list[ChoiceQuestion]:
    """Questions from instruction rows (dicts); rows without an ``answer`` are skipped."""
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"eval.answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    qs = []
    for i, row in enumerate(rows):
        if row.get("answer") is None:
            continue
        where = row_where(source, i)
        cands = parse_choices(row.get("instruction"), row.get("choices"), where=where)
        labels = [c[0] for c in cands]
        gold = gold_index(row, labels, where)
        inp = row.get("input") or ""
        prompt = render_prompt(row["instruction"], inp, template, where=where)
        if answer_format == "label":
            comps = _label_completions(row, labels, gold, where)
        else:
            comps = [TEXT_PREFIX + c[1] for c in cands]
        qs.append(ChoiceQuestion(prompt=prompt, completions=comps, answer=gold, source=source))
    return qs


@dataclass
class ChoiceResult:
    """Counts over all ranks. ``complete`` is False when ``should_stop`` cut the scoring short.
    ``picks``: question index -> picked candidate, for the questions this rank scored (all of them
    on one rank): what a paired comparison of two models on the same questions needs."""
    correct: int = 0
    total: int = 0
    source_correct: dict = field(default_factory=dict)
    source_total: dict = field(default_factory=dict)
    complete: bool = True
    picks: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def per_source(self) -> dict:
        return {s: (self.source_correct[s] / n if n else float("nan")) for s, n in self.source_total.items()}


def encode_candidates(tokenizer, question: ChoiceQuestion) -> list[tuple[list[int], int]]:
    """Per candidate: (token ids of BOS + prompt + completion, index of the first completion token),
    tokenized as training tokenizes an instruction row (without the trailing EOS)."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    enc = tokenizer([question.prompt] + [question.prompt + c for c in question.completions],
                    add_special_tokens=False, verbose=False)["input_ids"]
    p_ids, out = enc[0], []
    for f_ids in enc[1:]:
        n = 0
        while n < min(len(p_ids), len(f_ids)) and p_ids[n] == f_ids[n]:
            n += 1
        if n == len(f_ids):
            raise DataError(f"{question.source}: a completion adds no token to the prompt "
                            f"({question.completions!r})")
        out.append((head + list(f_ids), len(head) + n))
    return out


def _unwrap(model):
    m = model
    for _ in range(4):
        inner = getattr(m, "module", None)
        if inner is None:
            break
        m = inner
    return m


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs): then only
    the positions that score completions get logits, not the whole prompt times the vocabulary."""
    m = _unwrap(model)
    for _ in range(4):
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            return False
        if "logits_to_keep" in params:
            return True
        # peft/propulsion wrappers forward **kwargs to the wrapped model
        nxt = getattr(m, "base_model", None) or getattr(m, "model", None)
        if nxt is None or nxt is m or not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return False
        m = nxt
    return False


def _attention_kind(model) -> Optional[str]:
    """'sdpa' or 'eager' when the model takes a custom 4D attention mask (transformers passes one
    through as is to those two kernels); None otherwise (flash kernels: no shared prompts)."""
    from propulsion_ds.data.pack import attn_implementation
    kind = attn_implementation(_unwrap(model))
    return kind if kind in ("sdpa", "eager") else None


def _forward_scores(model, seqs: list[tuple[list[int], int]], pad_id: int, device, keep_logits: bool, torch):
    """Summed log-likelihood and token count of each sequence's completion, one padded forward."""
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (x, _) in enumerate(seqs):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, :len(x)] = 1
    # right padding: every row's positions are 0..len-1, pads come after and are masked
    pos = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T).contiguous()
    first = min(s for _, s in seqs) - 1  # the earliest position whose logits predict a completion token
    logits, off = _logits(model, ids, mask, pos, first, device, keep_logits)
    return _completion_scores(logits, [(b, list(range(len(x))), x, s) for b, (x, s) in enumerate(seqs)], off, torch)


def _logits(model, ids, mask, pos, first: int, device, keep_logits: bool):
    """Logits from position ``first`` on (all of them without ``logits_to_keep``), and the
    position of the first one returned."""
    T = ids.shape[1]
    kw = {"logits_to_keep": T - first} if keep_logits else {}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, T - logits.shape[1]


def _completion_scores(logits, where: list, off: int, torch):
    """``where``: per candidate (row, the row index of each of its tokens, its token ids, index of its
    first completion token). Token t is predicted by the logits at token t-1's place in the row."""
    sums, counts = [], []
    for b, place, x, s in where:
        rows = torch.tensor(place[s - 1:len(x) - 1], dtype=torch.long, device=logits.device) - off
        lg = logits[b].index_select(0, rows).float()
        tgt = torch.tensor(x[s:], dtype=torch.long, device=lg.device)
        lp = torch.log_softmax(lg, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        sums.append(float(lp.double().sum()))
        counts.append(len(x) - s)
    return sums, counts


def _shared_prompt_scores(model, groups: list[list[tuple[list[int], int]]], pad_id: int, device,
                          keep_logits: bool, kind: str, torch):
    """Like ``_forward_scores``, with one row per question: the tokens its candidates share, then
    each candidate's own tokens. A 4D mask lets each candidate's tokens see the shared part and
    their own earlier tokens only, and their positions continue from the shared part, so each
    candidate is scored as if it were alone after its prompt, while the prompt runs once."""
    layouts = []
    for cands in groups:
        m = min(s for _, s in cands)      # tokens 0..m-1 are the same in every candidate
        row, where, spans = list(cands[0][0][:m]), [], []
        for x, s in cands:
            start = len(row)
            row += x[m:]
            where.append((list(range(m)) + list(range(start, len(row))), x, s))
            spans.append((start, len(row)))
        layouts.append((row, m, where, spans))
    T = max(len(row) for row, *_ in layouts)
    B = len(layouts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, 1, T, T), dtype=torch.bool)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    for b, (row, m, _, spans) in enumerate(layouts):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        pos[b, :m] = torch.arange(m)
        allowed[b, 0, :m, :m] = causal[:m, :m]
        for a, e in spans:
            pos[b, a:e] = torch.arange(m, m + e - a)
            allowed[b, 0, a:e, :m] = True
            allowed[b, 0, a:e, a:e] = causal[:e - a, :e - a]
        idx = torch.arange(len(row), T)
        allowed[b, 0, idx, idx] = True     # a pad sees itself only: no row of the softmax is empty
    if kind == "eager":                    # eager adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    first = min(m for _, m, _, _ in layouts) - 1
    logits, off = _logits(model, ids, mask, pos, first, device, keep_logits)
    where = [(b, place, x, s) for b, (_, _, w, _) in enumerate(layouts) for place, x, s in w]
    return _completion_scores(logits, where, off, torch)


def pick(scores: Sequence[float]) -> int:
    """Index of the best score; ties go to the lowest index."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def score_questions(model, tokenizer, questions: Sequence[ChoiceQuestion], *, answer_format: str,
                    device=None, rank: int = 0, world_size: int = 1, batch_questions: int = 8,
                    should_stop: Optional[Callable[[], bool]] = None, progress: bool = False,
                    shared_prompt: bool = True) -> ChoiceResult:
    """Score every question, sharded over ranks, and return the counts summed over all ranks.

    Rank r scores questions r, r + world_size, ...: each question once over the ranks, so the
    accuracy is the same for any world size. Every rank runs the same number of forwards (short
    shards repeat a question whose result is discarded), so under ZeRO-3 the parameter gathers
    of every rank line up. Collective when ``world_size > 1``: call it on every rank.

    ``shared_prompt`` (sdpa and eager kernels): one row per question, its prompt run once for all
    its candidates (a 4D mask keeps each candidate apart); the scores are those of separate
    sequences up to float rounding, at about a third of the tokens for four short candidates.
    """
    import torch

    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"eval.answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    if batch_questions < 1:
        raise ValueError(f"batch_questions must be >= 1, got {batch_questions}")
    if device is None:
        p = next(iter(_unwrap(model).parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    from propulsion_ds.data.tokens import pad_token_id
    pad_id = pad_token_id(tokenizer)
    sources = list(dict.fromkeys(q.source for q in questions))
    src_idx = {s: i for i, s in enumerate(sources)}
    counts = [0.0] * (2 * len(sources))  # correct, total per source
    mine = list(range(rank, len(questions), world_size))
    encoded = {qi: encode_candidates(tokenizer, questions[qi]) for qi in mine}
    # Questions of similar length share a batch: less padding. Each score is the same whatever its
    # batch, so this changes nothing but the time.
    mine.sort(key=lambda qi: sum(len(x) for x, _ in encoded[qi]))
    per_rank = math.ceil(len(questions) / world_size) if questions else 0
    n_batches = math.ceil(per_rank / batch_questions)
    keep = _keeps_logits(model)
    kind = _attention_kind(model) if shared_prompt else None
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    reduce_dev = device if distributed and torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    complete = True
    picks = {}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, desc="choice eval")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for bi in range(n_batches):
                stop = bool(should_stop()) if should_stop is not None else False
                if distributed:  # every rank stops at the same batch, or ZeRO-3 gathers hang
                    t = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64, device=reduce_dev)
                    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                    stop = bool(t.item() > 0)
                if stop:
                    complete = False
                    break
                chunk = mine[bi * batch_questions:(bi + 1) * batch_questions]
                real = len(chunk)
                if not chunk:  # dummy work so this rank's forwards match the others'
                    chunk = [0]
                groups = [encoded[qi] if qi in encoded else encode_candidates(tokenizer, questions[qi])
                          for qi in chunk]
                if kind is not None:
                    sums, ns = _shared_prompt_scores(model, groups, pad_id, device, keep, kind, torch)
                else:
                    sums, ns = _forward_scores(model, [c for g in groups for c in g], pad_id, device, keep, torch)
                if bar is not None:
                    bar.update(1)
                if not real:
                    continue
                k = 0
                for qi in chunk:
                    q = questions[qi]
                    m = len(q.completions)
                    sc = sums[k:k + m] if answer_format == "label" else [s / n for s, n in zip(sums[k:k + m], ns[k:k + m])]
                    k += m
                    j = src_idx[q.source]
                    picks[qi] = pick(sc)
                    counts[2 * j] += float(picks[qi] == q.answer)
                    counts[2 * j + 1] += 1.0
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if distributed and counts:
        t = torch.tensor(counts, dtype=torch.float64, device=reduce_dev)
        torch.distributed.all_reduce(t)
        counts = t.cpu().tolist()
    res = ChoiceResult(complete=complete, picks=picks)
    for s, j in src_idx.items():
        c, n = int(round(counts[2 * j])), int(round(counts[2 * j + 1]))
        res.source_correct[s], res.source_total[s] = c, n
        res.correct += c
        res.total += n
    return res
