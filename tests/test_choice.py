"""Multiple-choice scoring (propulsion_ds/eval/choice.py) on real commonsense rows and the real
stories260K: parsing of every row shape, label/text completions, the score against a plain
forward, and batch-size and world-size invariance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import MODEL_DIR
from propulsion_ds.data.tokens import ALPACA_TEMPLATE_NO_INPUT, IGNORE_INDEX, tokenize
from propulsion_ds.errors import DataError
from propulsion_ds.data.choices import parse_choices, text_format_row
from propulsion_ds.eval.choice import ChoiceQuestion, build_questions, encode_candidates, score_questions

FIX = Path(__file__).resolve().parent / "fixtures" / "commonsense"
TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    return model, tok


def few_questions(fmt: str, per_task: int = 2) -> list[ChoiceQuestion]:
    qs = []
    for t in TASKS:
        qs += build_questions(rows_of(FIX / f"{t}_dev.jsonl")[:per_task], None, fmt, t)
    return qs


def test_parse_boolq_has_label_texts():
    row = rows_of(FIX / "boolq_dev.jsonl")[0]
    assert parse_choices(row["instruction"]) == [("true", "true"), ("false", "false")]


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_parse_four_options(task):
    for row in rows_of(FIX / f"{task}_dev.jsonl"):
        cands = parse_choices(row["instruction"])
        assert [c[0] for c in cands] == ["answer1", "answer2", "answer3", "answer4"]
        for k, (lab, text) in enumerate(cands):
            # the text sits between "AnswerK:" and the next label (or the answer format line)
            assert f"Answer{k + 1}: {text}" in row["instruction"]
            assert text == text.strip() and "Answer" not in text and text


def test_parse_three_and_five_options():
    three, five = rows_of(FIX / "shapes" / "arc_easy_train_3_and_5_options.jsonl")
    c3 = parse_choices(three["instruction"])
    assert [c[0] for c in c3] == ["answer1", "answer2", "answer3"]
    assert c3[2][1] == "A candle that is burning"
    c5 = parse_choices(five["instruction"])
    assert [c[1] for c in c5] == ["arteries", "glands", "muscles", "nerves", "veins"]


def test_parse_other_label_words_and_explicit_choices():
    ins = ("Which is right?\n\nSolution1: push the door Solution2: pull the door\n\n"
           "Answer format: solution1/solution2")
    assert parse_choices(ins) == [("solution1", "push the door"), ("solution2", "pull the door")]
    ins = "Pick one. option1: red option2: blue"
    assert parse_choices(ins, ["option1", "option2"]) == [("option1", "red"), ("option2", "blue")]


def test_bad_rows_name_the_row():
    with pytest.raises(DataError, match=r"dev: row 2: no candidates"):
        build_questions([{"instruction": "Answer format: a/b", "output": "the correct answer is a", "answer": "a"},
                         {"instruction": "no format here", "output": "x", "answer": "a"}], None, "label", "dev")
    with pytest.raises(DataError, match=r"dev: row 1: answer 'answer9' is not among"):
        row = dict(rows_of(FIX / "arc_easy_dev.jsonl")[0], answer="answer9")
        build_questions([row], None, "label", "dev")
    assert issubclass(DataError, ValueError) and DataError.exit_code == 2


def test_label_and_text_completions():
    row = rows_of(FIX / "openbookqa_dev.jsonl")[0]
    (q,) = build_questions([row], None, "label", "openbookqa")
    assert q.completions == [f"the correct answer is answer{k}" for k in range(1, 5)]
    assert q.completions[q.answer] == row["output"]
    assert q.prompt == ALPACA_TEMPLATE_NO_INPUT.format(instruction=row["instruction"], input="")
    (qt,) = build_questions([row], None, "text", "openbookqa")
    texts = [t for _, t in parse_choices(row["instruction"])]
    assert qt.completions == [f"the correct answer is {t}" for t in texts]
    assert qt.answer == q.answer
    assert text_format_row(row)["output"] == qt.completions[q.answer]
    # rows without an answer are no questions
    assert build_questions([{"instruction": "x", "output": "y"}], None, "label", "s") == []


def test_completion_tokens_are_the_trained_targets(stories):
    """The scored tokens are exactly the tokens training puts a loss on (EOS aside)."""
    import datasets
    from types import SimpleNamespace
    _, tok = stories
    row = rows_of(FIX / "arc_easy_dev.jsonl")[0]
    (q,) = build_questions([row], None, "label", "arc_easy")
    ids, start = encode_candidates(tok, q)[q.answer]
    cfg = SimpleNamespace(format="instruction", max_length=4096, template=None, packing=False, text_field="text")
    trained = tokenize(datasets.Dataset.from_list([row]), cfg, tok, "t")[0]
    target = [t for t in trained["labels"] if t != IGNORE_INDEX]
    assert trained["input_ids"][:len(ids)] == ids
    assert target == ids[start:] + [tok.eos_token_id]


@pytest.mark.parametrize("task", TASKS)
def test_text_format_trains_on_the_scored_text(stories, task):
    """answer_format "text": the rows carrying an answer are trained to write the gold option's
    text, the very tokens the text format scores; rows without an answer keep their output; the
    label format trains the output as written; the two builds never share a cache entry."""
    import datasets
    from types import SimpleNamespace
    from propulsion_ds.data.cache import cache_key, fingerprint
    _, tok = stories
    rows = rows_of(FIX / f"{task}_dev.jsonl")[:2] + [{"instruction": "say hi", "output": "hi", "answer": None}]
    cfg = SimpleNamespace(format="instruction", max_length=4096, template=None, packing=False, text_field="text")
    raw = datasets.Dataset.from_list(rows)
    for fmt in ("label", "text"):
        trained = tokenize(raw, cfg, tok, "t", answer_format=fmt)
        for row, got in zip(rows, trained):
            target = [t for t in got["labels"] if t != IGNORE_INDEX]
            if row["answer"] is None:
                assert tok.decode(target[:-1]) == "hi"
                continue
            (q,) = build_questions([row], None, fmt, task)
            ids, start = encode_candidates(tok, q)[q.answer]
            assert target == ids[start:] + [tok.eos_token_id], (fmt, tok.decode(target))
            assert tok.decode(target[:-1]).strip() == (row["output"] if fmt == "label" else
                                                       text_format_row(row)["output"])
    files = SimpleNamespace(**vars(cfg), eval_fraction=0.0, train=str(FIX / f"{task}_dev.jsonl"), eval=None)
    keys = {fmt: cache_key(fingerprint(files, tok, answer_format=fmt)) for fmt in ("label", "text")}
    assert keys["label"] != keys["text"]


def _plain_loglik(model, ids, start) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[i - 1, ids[i]] for i in range(start, len(ids))))


@pytest.mark.parametrize("fmt", ["label", "text"])
def test_score_equals_plain_forward(stories, fmt):
    model, tok = stories
    qs = few_questions(fmt, per_task=1)
    want = 0
    for q in qs:
        scores = []
        for ids, start in encode_candidates(tok, q):
            s = _plain_loglik(model, ids, start)
            scores.append(s if fmt == "label" else s / (len(ids) - start))
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        want += best == q.answer
    res = score_questions(model, tok, qs, answer_format=fmt, batch_questions=4)
    assert res.complete and res.total == len(qs) and res.correct == want
    assert set(res.per_source) == set(TASKS)


def test_batching_invariance(stories):
    model, tok = stories
    qs = few_questions("text", per_task=2)
    picks = {}
    for bq in (1, 8):
        res = score_questions(model, tok, qs, answer_format="text", batch_questions=bq)
        picks[bq] = (res.correct, res.source_correct)
    assert picks[1] == picks[8]


def test_world_size_invariance_and_equal_forwards(stories):
    """Each rank scores its shard (no process group: each returns its own counts); the shards sum to
    the one-rank result and every rank runs the same number of forwards."""
    model, tok = stories
    qs = few_questions("label", per_task=2)[:7]   # 7 questions: uneven shards over 2 and 3 ranks
    one = score_questions(model, tok, qs, answer_format="label", batch_questions=2)
    for world in (2, 3):
        calls, correct, total = [], 0, 0
        for rank in range(world):
            n = [0]
            h = model.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
            try:
                r = score_questions(model, tok, qs, answer_format="label", batch_questions=2,
                                    rank=rank, world_size=world)
            finally:
                h.remove()
            calls.append(n[0])
            correct, total = correct + r.correct, total + r.total
        assert total == one.total == len(qs)
        assert correct == one.correct
        assert len(set(calls)) == 1, calls


def test_should_stop_marks_incomplete(stories):
    model, tok = stories
    qs = few_questions("label", per_task=1)
    res = score_questions(model, tok, qs, answer_format="label", batch_questions=1, should_stop=lambda: True)
    assert not res.complete and res.total == 0


def _shared_vs_alone(model, groups, kind):
    from propulsion_ds.eval.choice import _shared_prompt_scores
    with torch.no_grad():
        got, counts = _shared_prompt_scores(model, groups, 0, torch.device("cpu"), True, kind, torch)
    want = [_plain_loglik(model, ids, s) for g in groups for ids, s in g]
    assert counts == [len(ids) - s for g in groups for ids, s in g]
    return got, want


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_shared_prompt_scores_equal_each_candidate_alone(stories, kind):
    """One row per question (prompt once, candidates side by side under a 4D mask, padded to the
    longest question) gives each candidate the score of its own unpadded forward."""
    from transformers import AutoModelForCausalLM
    _, tok = stories
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation=kind).eval()
    groups = [encode_candidates(tok, q) for q in few_questions("text", per_task=2)]
    assert len({len(g[0][0]) for g in groups}) > 3                    # questions of varied length
    got, want = _shared_vs_alone(model, groups, kind)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_shared_prompt_with_candidates_that_split_the_prompt_differently():
    """Candidates whose first completion token starts at different places (a tokenizer merged the
    prompt's end into one of them), on a model with q/k/v biases."""
    from helpers import tiny_qwen2
    model = tiny_qwen2().eval()
    g = torch.Generator().manual_seed(0)
    groups = []
    for n in (9, 17, 5):
        prompt = torch.randint(1, 128, (n,), generator=g).tolist()
        cands = []
        for j, (cut, extra) in enumerate([(0, 3), (1, 4), (2, 1), (0, 6)]):
            ids = prompt[:n - cut] + torch.randint(1, 128, (cut + extra,), generator=g).tolist()
            cands.append((ids, n - cut))
        groups.append(cands)
    got, want = _shared_vs_alone(model, groups, "sdpa")
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_shared_prompt_picks_what_separate_sequences_pick(stories):
    model, tok = stories
    qs = few_questions("text", per_task=2)
    a = score_questions(model, tok, qs, answer_format="text", batch_questions=3, shared_prompt=True)
    b = score_questions(model, tok, qs, answer_format="text", batch_questions=3, shared_prompt=False)
    assert a.picks == b.picks and a.correct == b.correct and len(a.picks) == len(qs)
