"""Task accuracy during training (propulsion_ds.train.gen_eval) on the real stories260K and real GSM8K rows.

Single process: prompt/reference split, metrics on hand-made strings, shard plan, generation equal
to a plain ``model.generate`` per prompt (with Propulsion's hooks on), counts, TensorBoard output.
Two ranks (slow): ZeRO-3 with every weight partitioned, prompts of different lengths, an odd row
count and stop tokens that end rows at different steps, an exact-match count known in advance.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import MODEL_DIR, ROOT, run_train, tail
from propulsion_ds import data
from propulsion_ds.train import gen_eval
from propulsion_ds.config import DataConfig, EvalConfig
from propulsion_ds.model import load_tokenizer
from propulsion_ds.method.propulsion import DELTA_NAME, PropulsionConfig, inject

GSM8K = ROOT / "assets" / "data" / "gsm8k_sample.jsonl"
PROBE = ROOT / "tests" / "gen_eval_probe.py"
PERIOD = 426            # stories260K's "." piece: a stop token that ends rows at different steps


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(MODEL_DIR))


@pytest.fixture(scope="module")
def raw():
    return data.load_raw(str(GSM8K))


@pytest.fixture(scope="module")
def rows(raw, tok):
    """The first 12 GSM8K problems through the real instruction pipeline (Alpaca prompt, BOS/EOS)."""
    return data.tokenize(raw.select(range(12)), DataConfig(format="instruction", max_length=1024), tok, "gsm8k")


def _base():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.config.use_cache = False          # as the trainer loads it (model.load_base_model)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return _base()


def _delta(model, seed=0, spread=0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = getattr(model, DELTA_NAME).shape
    return torch.randn(shape, generator=g) * spread


@pytest.fixture(scope="module")
def adapted():
    """stories260K with Propulsion (k=15) and a random delta: z**k within about 1 +- 0.4."""
    model = _base()
    inject(model, PropulsionConfig())
    with torch.no_grad():
        getattr(model, DELTA_NAME).copy_(_delta(model))
    return model


def plain_generate(model, prompt_ids, max_new_tokens) -> list:
    """The reference: transformers' generate on one unpadded prompt, nothing else passed."""
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


# ----------------------------------------------------------------------------- split

def test_split_gsm8k_rows_gives_prompt_and_answer(rows, raw, tok):
    for k, row in enumerate(rows):
        s = gen_eval.split_sample(row["input_ids"], row["labels"], tok)
        n = len(s.prompt_ids)
        assert s.prompt_ids == row["input_ids"][:n]
        assert all(x == -100 for x in row["labels"][:n]) and row["labels"][n] != -100
        assert s.prompt_ids[0] == tok.bos_token_id
        assert tok.decode(s.prompt_ids, skip_special_tokens=True).endswith("### Response:\n")
        assert raw[k]["instruction"] in tok.decode(s.prompt_ids)
        # the answer text, the EOS the pipeline appends dropped
        assert s.reference == raw[k]["output"], k
        assert s.reference.rstrip().split("####")[-1].strip().replace(",", "").lstrip("-").isdigit()


def test_split_hand_made_rows(tok):
    ids = [1, 300, 301, 302, 303, 304, 305, 2]
    s = gen_eval.split_sample(ids, [-100, -100, -100, 302, 303, -100, 305, 2], tok)
    assert s.prompt_ids == [1, 300, 301]
    assert s.reference == tok.decode([302, 303])           # first run of targets only
    text = gen_eval.split_sample(ids, ids, tok)             # a text row: labels == input_ids
    assert text.prompt_ids == [1] and text.reference == tok.decode(ids[1:], skip_special_tokens=True)
    with pytest.raises(ValueError, match="no target token"):
        gen_eval.split_sample(ids, [-100] * 8, tok)
    with pytest.raises(ValueError, match="labels"):
        gen_eval.split_sample(ids, ids[:-1], tok)
    as_list = gen_eval.split_samples([{"input_ids": ids, "labels": ids}] * 3, tok, limit=2)
    assert len(as_list) == 2


# ----------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("text, want", [
    ("She has 3 + 4 = <<3+4=7>>7.\n#### 7", "7"),
    ("#### 1,000.", "1000"),
    ("#### $1,200\nQuestion: Tom has", "1200"),        # first line after the marker only
    ("#### 3\nmore\n#### 4 ", "4"),                     # the LAST marker
    ("####-5", "-5"),
    ("#### 0.5.", "0.5"),
    ("#### 72 clips", "72 clips"),                      # not a bare number: only stripped
    ("no marker, 72", None),
    ("ends with the marker ####", ""),
])
def test_marker_answer(text, want):
    assert gen_eval.marker_answer(text, "####") == want


def test_is_correct_by_metric():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gen_eval.is_correct("so 72 in all\n#### 72.\n\nQuestion: next", ref, "marker")
    assert gen_eval.is_correct("#### 72", ref, "marker", "####")
    assert not gen_eval.is_correct("#### 73", ref, "marker")
    assert not gen_eval.is_correct("the answer is 72", ref, "marker")    # no marker generated
    assert not gen_eval.is_correct("#### 72", "72", "marker")             # reference lacks the marker
    assert gen_eval.is_correct("So, Answer: 72", "Answer: 72", "marker", "Answer:")
    assert not gen_eval.is_correct("the answer: 72", "Answer: 72", "marker", "Answer:")  # case matters
    assert gen_eval.is_correct("  Paris.\n", "Paris.", "exact")
    assert not gen_eval.is_correct("Paris", "Paris.", "exact")
    assert gen_eval.is_correct("anything", ref, "none") is None
    with pytest.raises(ValueError, match="eval.metric"):
        gen_eval.is_correct("a", "a", "fuzzy")
    with pytest.raises(ValueError, match="answer_marker"):
        gen_eval.marker_answer("a", "")


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (1, 3), (5, 4), (0, 2), (3, 1)])
def test_shard_plan_gives_every_rank_the_same_number_of_calls(n, world):
    plans = [gen_eval.shard_indices(n, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    counted = sorted(i for p in plans for i, c in p if c)
    assert counted == list(range(n))                 # every row scored exactly once
    assert all(0 <= i < n for p in plans for i, _ in p)


# ----------------------------------------------------------------------------- generation

def test_generation_equals_plain_generate(adapted, base, rows, tok):
    """Left-padded batches of 5 (12 prompts, 154-367 tokens: up to 213 pads) through the Propulsion
    hooks give exactly what transformers' generate gives one unpadded prompt at a time."""
    prompts = [s.prompt_ids for s in gen_eval.split_samples(rows, tok)]
    assert len({len(p) for p in prompts}) > 6
    want = [tok.decode(plain_generate(adapted, p, 20), skip_special_tokens=True) for p in prompts]
    got = gen_eval.generate_texts(adapted, tok, prompts, max_new_tokens=20, batch_size=5)
    assert got == want
    # the hooks are in play: the base model says something else
    plain = [tok.decode(plain_generate(base, p, 20), skip_special_tokens=True) for p in prompts]
    assert sum(a != b for a, b in zip(plain, want)) >= 6


def test_generate_batch_ids_cache_and_early_stop(rows, tok):
    """Token ids equal plain generate's, rows that stop early (".") carry no trailing pads, and
    every step after the prompt feeds one token: the cache is on although the model says no (a
    checkpoint saved with use_cache=False, as training leaves it, gets that generation config)."""
    model = _base()
    model.generation_config.eos_token_id = [2, PERIOD]
    model.generation_config.use_cache = False
    prompts = [s.prompt_ids for s in gen_eval.split_samples(rows, tok)][:4]
    want = [plain_generate(model, p, 24) for p in prompts]       # no cache: the slow reference
    assert len({len(w) for w in want}) > 1 and min(len(w) for w in want) < 24
    widths = []
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = gen_eval.generate_batch(model, prompts, max_new_tokens=24, pad_id=2, device="cpu", synced_gpus=False)
    assert got == want
    assert widths[0] == max(len(p) for p in prompts) and set(widths[1:]) == {1}


def _scored_rows(model, prompts, wrong, max_new_tokens, tok):
    """Rows whose reference IS the single-process greedy output, except rows in ``wrong``."""
    out = []
    for k, p in enumerate(prompts):
        gen = plain_generate(model, p, max_new_tokens)
        if k in wrong:
            bad = [t + 1 if t not in (426, 2) else 300 for t in gen[:1]] + gen[1:]
            assert tok.decode(bad, skip_special_tokens=True).strip() != tok.decode(gen, skip_special_tokens=True).strip()
            gen = bad
        out.append({"input_ids": p + gen, "labels": [-100] * len(p) + gen})
    return out, len(prompts) - len(wrong)


def test_generation_eval_counts_exact_matches(adapted, rows, tok):
    prompts = [s.prompt_ids for s in gen_eval.split_samples(rows, tok)][:9]
    scored, expect = _scored_rows(adapted, prompts, {1, 4, 5}, 12, tok)
    adapted.train()
    res = gen_eval.generation_eval(adapted, tok, scored, EvalConfig(generate=True, generate_samples=9,
                                                                    max_new_tokens=12, metric="exact"),
                                   batch_size=4)
    assert adapted.training                      # mode restored
    adapted.eval()
    assert (res["correct"], res["n"]) == (expect, 9) and res["accuracy"] == pytest.approx(expect / 9)
    assert len(res["examples"]) == gen_eval.N_EXAMPLES
    prompt, ref, generation = res["examples"][1]
    assert prompt == tok.decode(prompts[1], skip_special_tokens=True) and ref != generation
    assert res["examples"][0][1] == res["examples"][0][2]
    # generate_samples limits the rows; metric none counts but does not score
    few = gen_eval.generation_eval(adapted, tok, scored, EvalConfig(generate_samples=2, max_new_tokens=12,
                                                                    metric="exact"))
    assert (few["correct"], few["n"]) == (1, 2)
    none = gen_eval.generation_eval(adapted, tok, scored, EvalConfig(generate_samples=3, max_new_tokens=12,
                                                                     metric="none"))
    assert none["accuracy"] is None and none["n"] == 3 and none["correct"] == 0


def test_gsm8k_marker_accuracy_of_stories260K(base, rows, tok):
    """The real number: a 260K-parameter story model solves no GSM8K problem (it never writes ####)."""
    res = gen_eval.generation_eval(base, tok, rows, EvalConfig(generate_samples=8, max_new_tokens=32))
    assert (res["accuracy"], res["correct"], res["n"]) == (0.0, 0, 8)
    assert all("####" in ref and "####" not in g for _, ref, g in res["examples"])


# ----------------------------------------------------------------------------- logging

def test_log_generation_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    result = {"accuracy": 0.25, "correct": 1, "n": 4,
              "examples": [("Q: 2+2?", "#### 4", "#### 5\nmore"), ("Q: 1+1?", "#### 2", "")]}
    ran = []
    w = SummaryWriter(str(tmp_path / "tb"))
    record = gen_eval.log_generation(w, result, 7, run=lambda fn: (ran.append(1), fn()))
    record_none = gen_eval.log_generation(w, {**result, "accuracy": None}, 8)
    w.close()
    assert ran == [1]
    assert record == {"eval_accuracy": 0.25, "eval_correct": 1, "eval_generated": 4}
    assert record_none["eval_accuracy"] is None
    assert gen_eval.log_generation(None, result, 9) == record          # other ranks: fields only
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(7, 0.25)]
    texts = acc.Tensors("eval/generations/text_summary")          # add_text's tag
    assert [t.step for t in texts] == [7, 8]
    body = texts[0].tensor_proto.string_val[0].decode()
    for part in ("Q: 2+2?", "#### 4", "    #### 5\n    more", "(empty)"):
        assert part in body


# ----------------------------------------------------------------------------- 2 ranks, ZeRO-3

@pytest.mark.slow
def test_two_ranks_zero3_partitioned_exact_count(tmp_path, adapted, rows, tok):
    """7 prompts of 154-367 tokens over 2 ranks (4 + 3, rank 1 padded), stop token "." so rows end
    at different steps; references = single-process greedy output except rows 2 and 5."""
    max_new = 24
    model = copy.deepcopy(adapted)
    model.generation_config.eos_token_id = [2, PERIOD]
    prompts = [s.prompt_ids for s in gen_eval.split_samples(rows, tok)][:7]
    scored, expect = _scored_rows(model, prompts, {2, 5}, max_new, tok)
    lengths = [len(r["labels"]) - len(p) for r, p in zip(scored, prompts)]
    # ranks really stop at different times: call j of rank 0 and of rank 1 end at different steps
    shard0, shard1 = gen_eval.shard_indices(7, 0, 2), gen_eval.shard_indices(7, 1, 2)
    assert any(lengths[a] != lengths[b] for (a, _), (b, _) in zip(shard0, shard1)), lengths
    assert min(lengths) < max_new
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    torch.save(getattr(adapted, DELTA_NAME).detach().clone(), tmp_path / "delta.pt")
    out = tmp_path / "result.json"
    proc = run_train(["--rows", tmp_path / "rows.jsonl", "--delta", tmp_path / "delta.pt",
                      "--eos", f"2,{PERIOD}", "--max-new-tokens", max_new, "--batch-sizes", "1,3",
                      "--out", out], nproc=2, script=PROBE, timeout=240)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln and "Warning" not in ln]
    assert proc.returncode == 0, "\n".join(errors[:6]) + "\n" + tail(proc.stderr)
    got = json.loads(out.read_text())
    assert got["world"] == 2
    assert got["partitioned"]["local"] < got["partitioned"]["full"]
    for bs, res in got["results"].items():
        assert (res["correct"], res["n"]) == (expect, 7), (bs, res["correct"], res["n"])
        assert res["training_after"] is True
        assert [ref for _, ref, _ in res["examples"]] == [
            tok.decode(r["labels"][len(p):], skip_special_tokens=True) for r, p in zip(scored[:4], prompts)]
