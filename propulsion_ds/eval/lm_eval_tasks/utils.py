"""lm-evaluation-harness glue for the commonsense tasks: the same questions, prompts, completions
and scores as the trainer's ``eval.metric: "choice"`` (propulsion_ds/eval/choice.py).

The YAML files beside this one name these functions. ``load`` is the tasks' ``custom_dataset``:
lm-eval calls it with the run's metadata, which holds the ``--model_args`` (``pretrained``,
``tokenizer``) and whatever ``--metadata`` adds (``data_dir``, ``split``, ``template``); see
docs/EVAL.md.

Exact agreement with the trainer's scores: lm-eval moves a context's trailing whitespace (the
"\\n" that ends the Alpaca prompt) into every continuation, so each candidate's log-likelihood
carries the same extra term c = log P("\\n" | prompt without it). The documents say so openly:
the context is the prompt without its trailing whitespace and each choice starts with it. A sum
ranks the candidates as without c (``label``). For the per-token mean (``text``) each document
gets one more choice, the whitespace alone, whose log-likelihood is c itself; ``process_results``
subtracts it and divides by the completion's token count, computed here with the model's
tokenizer exactly as training tokenizes.
"""
from __future__ import annotations

import os

DATA_ENV = "PROPULSION_EVAL_DATA"


def _tokenizer(pretrained=None, tokenizer=None, trust_remote_code=False, **_):
    from transformers import AutoTokenizer
    name = tokenizer or pretrained
    if not name:
        raise ValueError("propulsion commonsense tasks: no tokenizer: pass --model_args pretrained=... "
                         "(or tokenizer=...)")
    return AutoTokenizer.from_pretrained(name, trust_remote_code=str(trust_remote_code).lower() == "true")


def load(stem: str, answer_format: str, data_dir=None, split="dev", template=None, **metadata):
    """The task's documents: one per row of ``<data_dir>/<stem>_<split>.jsonl`` with an answer."""
    import datasets

    from propulsion_ds.eval.choice import build_questions, encode_candidates

    data_dir = data_dir or os.environ.get(DATA_ENV)
    if not data_dir:
        raise ValueError(f"propulsion commonsense tasks: no data directory: pass --metadata "
                         f"'{{\"data_dir\": \"DIR\"}}' or set {DATA_ENV}")
    path = os.path.join(str(data_dir), f"{stem}_{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"propulsion commonsense tasks: {path} not found (data_dir={data_dir!r}, "
                                f"split={split!r})")
    rows = datasets.load_dataset("json", data_files=path, split="train").to_list()
    questions = build_questions(rows, template, answer_format, f"{stem}_{split}")
    tok = _tokenizer(**metadata)
    encode = _lm_eval_encoder(tok, metadata.get("add_bos_token"))
    docs = []
    for i, q in enumerate(questions):
        body, ws = _split(q.prompt)
        # training prepends BOS; lm-eval prepends what the tokenizer adds by default, so a tokenizer
        # that adds none gets the BOS as text, which lm-eval then encodes without special tokens
        bos = "" if tok.bos_token_id is None or encode(body)[:1] == [tok.bos_token_id] else tok.bos_token
        _check_tokens(encode, tok, q, bos + body, ws, f"{path}: question {i + 1}")
        docs.append({
            "prompt": q.prompt,
            "bos_text": bos,
            "completions": q.completions,
            "gold": q.answer,
            # tokens of each completion as training counts them (EOS not included)
            "n_tokens": [len(ids) - start for ids, start in encode_candidates(tok, q)],
            "trailing_ws": len(q.prompt) > len(q.prompt.rstrip()),
            "answer_format": answer_format,
        })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _split(prompt: str) -> tuple[str, str]:
    body = prompt.rstrip()
    return body, prompt[len(body):]


def _lm_eval_encoder(tok, add_bos_token=None):
    """How lm-eval's ``hf`` model encodes a context or context + continuation."""
    if isinstance(add_bos_token, str):
        add_bos_token = add_bos_token.lower() == "true"

    def encode(text: str) -> list:
        if tok.bos_token and text.startswith(tok.bos_token):
            return tok.encode(text, add_special_tokens=False)
        if add_bos_token is not None:
            return tok.encode(text, add_special_tokens=add_bos_token)
        return tok.encode(text)
    return encode


def _check_tokens(encode, tok, q, context: str, ws: str, where: str) -> None:
    """lm-eval's tokens of each request must be the trainer's: else say so rather than score
    something else."""
    from propulsion_ds.eval.choice import encode_candidates

    ctx = encode(context)
    for (ids, start), comp in zip(encode_candidates(tok, q), q.completions):
        whole = encode(context + ws + comp)
        if whole != ids or whole[:len(ctx)] != ctx or len(ctx) > start:
            raise ValueError(f"propulsion commonsense tasks: {where}: lm-eval would tokenize the prompt and "
                             f"completion differently from training with this tokenizer; see docs/EVAL.md (BOS)")


def doc_to_text(doc) -> str:
    return doc["bos_text"] + _split(doc["prompt"])[0]


def doc_to_choice(doc) -> list:
    ws = _split(doc["prompt"])[1]
    extra = [ws] if doc["answer_format"] == "text" and ws else []
    return [ws + c for c in doc["completions"]] + extra


def doc_to_target(doc) -> int:
    return doc["gold"]


def process_results(doc, results) -> dict:
    """``acc``: 1 when the best-scoring candidate is the gold one (ties: the lowest index)."""
    from propulsion_ds.eval.choice import pick

    lls = [float(r[0]) for r in results]
    n = len(doc["completions"])
    if doc["answer_format"] == "text":
        c = lls[n] if doc["trailing_ws"] else 0.0
        scores = [(ll - c) / k for ll, k in zip(lls[:n], doc["n_tokens"])]
    else:
        scores = lls[:n]
    return {"acc": float(pick(scores) == doc["gold"])}


# one loader per task (lm-eval's custom_dataset takes the metadata as keyword arguments)
def _loader(stem, fmt):
    def f(**metadata):
        return load(stem, fmt, **metadata)
    return f


load_boolq_label = _loader("boolq", "label")
load_boolq_text = _loader("boolq", "text")
load_arc_easy_label = _loader("arc_easy", "label")
load_arc_easy_text = _loader("arc_easy", "text")
load_arc_challenge_label = _loader("arc_challenge", "label")
load_arc_challenge_text = _loader("arc_challenge", "text")
load_openbookqa_label = _loader("openbookqa", "label")
load_openbookqa_text = _loader("openbookqa", "text")
