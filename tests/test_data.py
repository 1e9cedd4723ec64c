"""Data pipeline on real files (tinyshakespeare, self-instruct seed tasks) and the real
stories260K SentencePiece tokenizer: masking, truncation, errors, sharded batches, packed text rows.
Packing's attention isolation and the other formats are in test_packing.py; the cache in
test_data_cache.py."""
import copy
import json
import logging
import os

import datasets
import pytest
import torch
from transformers import AutoTokenizer

import helpers
from propulsion_ds.config import DataConfig
from propulsion_ds.data import (
    ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, IGNORE_INDEX, DataError, batches_per_epoch,
    build_datasets, check_vocab, collate, epoch_batches, get_batch, load_raw, pad_token_id,
    document_lengths, resolve_files,
)

ROOT = str(helpers.ROOT)
SHAKESPEARE = os.path.join(ROOT, "assets", "data", "tinyshakespeare.txt")
SELF_INSTRUCT = os.path.join(ROOT, "assets", "data", "self_instruct.jsonl")
MODEL_DIR = str(helpers.MODEL_DIR)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def paragraphs(text):
    return [p for p in text.split("\n\n") if p]


# ------------------------------------------------------------------------------ tokenizer facts

def test_tokenizer_adds_bos_itself_so_data_adds_it_explicitly_once(tok):
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id == 1
    assert tok("Hello", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    assert tok.eos_token_id == 2 and tok.pad_token_id is None
    assert pad_token_id(tok) == tok.eos_token_id


# ------------------------------------------------------------------------------ text

def test_packing_real_shakespeare_whole_documents_decode_to_source(tok, cache):
    L = 128
    cfg = DataConfig(train=SHAKESPEARE, format="text", max_length=L, packing=True)
    built = build_datasets(cfg, tok, cache_dir=cache)
    train = built.train
    assert built.eval is None and built.eval_samples is None
    assert train.column_names == ["input_ids", "labels", "position_ids"]

    with open(SHAKESPEARE, encoding="utf-8") as f:
        paras = paragraphs(f.read())
    docs = [[tok.bos_token_id] + ids + [tok.eos_token_id] for ids in tok(paras, add_special_tokens=False)["input_ids"]]
    # every document (or L-piece of a longer one) appears exactly once, contiguous, positions 0..n-1
    expected = sorted(tuple(d[i:i + L]) for d in docs for i in range(0, len(d), L) if len(d[i:i + L]) >= 2)
    rows = train[:]
    got = []
    for ids, labels, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        assert 2 <= len(ids) <= L and len(labels) == len(pos) == len(ids)
        start = 0
        for n in document_lengths(pos):
            assert pos[start:start + n] == list(range(n))
            assert labels[start] == IGNORE_INDEX and labels[start + 1:start + n] == ids[start + 1:start + n]
            got.append(tuple(ids[start:start + n]))
            start += n
    assert sorted(got) == expected
    assert any(len(document_lengths(p)) > 1 for p in rows["position_ids"])  # short paragraphs share rows
    total = sum(len(d) for d in expected)
    assert total / (len(train) * L) > 0.97  # best-fit decreasing fills the rows
    whole = [g for g in got if g[0] == tok.bos_token_id and g[-1] == tok.eos_token_id]
    assert len(whole) == sum(len(d) <= L for d in docs) > 5000
    assert sorted(tok.batch_decode([list(g[1:-1]) for g in whole])) == sorted(
        p for p, d in zip(paras, docs) if len(d) <= L)


def test_text_unpacked_one_row_per_document_truncation_counted(tok, cache, tmp_path, caplog):
    docs = ["Once upon a time there was a cat.", "The cat sat. " * 40, "Lily liked the park."]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": d, "n": i} for i, d in enumerate(docs)])
    cfg = DataConfig(train=path, format="text", text_field="body", max_length=32, packing=False)
    with caplog.at_level(logging.WARNING, logger="propulsion_ds.data"):
        train = build_datasets(cfg, tok, cache_dir=cache).train
    assert len(train) == 3
    for d, row in zip(docs, train):
        full = [tok.bos_token_id] + enc(tok, d) + [tok.eos_token_id]
        assert row["input_ids"] == full[:32] and row["labels"] == row["input_ids"]
    assert len(train[1]["input_ids"]) == 32
    assert "1 of 3 samples longer than max_length=32" in caplog.text


def test_missing_text_field_names_field_and_file(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hi"}])
    cfg = DataConfig(train=path, format="text", text_field="body", max_length=16)
    with pytest.raises(DataError, match=r"docs\.jsonl: no field 'body'.*fields: text"):
        build_datasets(cfg, tok, cache_dir=cache)


def test_short_documents_are_packed_not_dropped(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}, {"text": "yo"}])
    train = build_datasets(DataConfig(train=path, max_length=64), tok, cache_dir=cache).train
    assert len(train) == 1 and document_lengths(train[0]["position_ids"]) == [len(enc(tok, "hi")) + 2,
                                                                            len(enc(tok, "yo")) + 2]


# ------------------------------------------------------------------------------ instruction

def test_instruction_masking_alpaca_with_and_without_input(tok, cache, tmp_path):
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "Blue is a color."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
        {"instruction": "Say hi.", "output": "Hi there!"},  # no input field in this row
    ]
    path = write_jsonl(tmp_path / "inst.jsonl", rows)
    cfg = DataConfig(train=path, format="instruction", max_length=256, packing=False)
    train = build_datasets(cfg, tok, cache_dir=cache).train
    assert len(train) == 3
    for r, row in zip(rows, train):
        inp = r.get("input") or ""
        tpl = ALPACA_TEMPLATE if inp else ALPACA_TEMPLATE_NO_INPUT
        prompt = tpl.format(instruction=r["instruction"], input=inp)
        p_ids, f_ids = enc(tok, prompt), enc(tok, prompt + r["output"])
        assert f_ids[: len(p_ids)] == p_ids  # the prompt ends in "\n": a clean token boundary
        ids, labels = row["input_ids"], row["labels"]
        assert ids == [tok.bos_token_id] + f_ids + [tok.eos_token_id]
        n_prompt = 1 + len(p_ids)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        targets = labels[n_prompt:]
        assert targets == f_ids[len(p_ids):] + [tok.eos_token_id]
        assert tok.decode(targets[:-1]) == r["output"]
        assert tok.decode(ids[1:n_prompt]) == prompt


def test_instruction_custom_template(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Greet", "input": "Bob", "output": "Hello Bob."}])
    cfg = DataConfig(train=path, format="instruction", max_length=64, template="Q: {instruction} ({input})\nA:",
                     packing=False)
    train = build_datasets(cfg, tok, cache_dir=cache).train
    row = train[0]
    targets = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tok.decode(targets[:-1]) == "Hello Bob."
    assert targets[-1] == tok.eos_token_id
    prompt_ids = row["input_ids"][: row["labels"].index(targets[0])]
    assert tok.decode(prompt_ids, skip_special_tokens=True) == "Q: Greet (Bob)\nA:"

    bad = DataConfig(train=path, format="instruction", max_length=64, template="{question}")
    with pytest.raises(DataError, match="data.template"):
        build_datasets(bad, tok, cache_dir=cache)


def test_shipped_self_instruct_builds(tok, cache, caplog):
    with open(SELF_INSTRUCT) as f:
        lines = [json.loads(x) for x in f]
    assert len(lines) == 175 and all(set(r) == {"instruction", "input", "output"} for r in lines)
    cfg = DataConfig(train=SELF_INSTRUCT, format="instruction", max_length=256, packing=False)
    with caplog.at_level(logging.WARNING, logger="propulsion_ds.data"):
        train = build_datasets(cfg, tok, cache_dir=cache).train
    assert 0 < len(train) <= 175
    for row in train:
        assert 2 <= len(row["input_ids"]) <= 256 and len(row["labels"]) == len(row["input_ids"])
        assert row["labels"][0] == IGNORE_INDEX and any(t != IGNORE_INDEX for t in row["labels"])
        if len(row["input_ids"]) < 256:
            assert row["labels"][-1] == tok.eos_token_id
    assert "truncated from the right" in caplog.text  # some seed tasks exceed 256 tokens here


def test_truncation_and_drop_counts(tok, cache, tmp_path, caplog):
    rows = [
        {"instruction": "Short.", "input": "", "output": "Fine."},
        {"instruction": "Long output.", "input": "", "output": "word " * 200},
        {"instruction": "Long prompt " * 100, "input": "", "output": "Lost."},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = DataConfig(train=path, format="instruction", max_length=160, packing=False)
    with caplog.at_level(logging.WARNING, logger="propulsion_ds.data"):
        train = build_datasets(cfg, tok, cache_dir=cache).train
    assert len(train) == 2  # the long prompt leaves no target and is dropped
    assert len(train[1]["input_ids"]) == 160 and train[1]["labels"][-1] != IGNORE_INDEX
    assert "mixed.jsonl: 1 of 3 samples longer than max_length=160, truncated from the right and kept" in caplog.text
    assert "mixed.jsonl: 1 of 3 samples dropped" in caplog.text


def test_every_sample_too_long_is_an_error(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "x " * 300, "output": "y"}] * 3)
    cfg = DataConfig(train=path, format="instruction", max_length=48)
    with pytest.raises(DataError, match=r"every sample in .*long\.jsonl is longer than max_length=48"):
        build_datasets(cfg, tok, cache_dir=cache)


def test_instruction_missing_output_field(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "noout.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"noout\.jsonl: no field 'output'"):
        build_datasets(DataConfig(train=path, format="instruction"), tok, cache_dir=cache)


# ------------------------------------------------------------------------------ file errors

def test_malformed_jsonl_reports_file_and_line(tok, cache, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON") as e:
        load_raw(str(path), cache_dir=cache)
    assert "\n" not in str(e.value)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_raw(str(path), cache_dir=cache)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.txt", "\n")])
def test_empty_data_set(tok, cache, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: empty data set"):
        build_datasets(DataConfig(train=str(path)), tok, cache_dir=cache)


def test_resolve_files_globs_dirs_and_errors(tmp_path, cache):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    a = write_jsonl(d / "a.jsonl", [{"text": "a"}])
    b = write_jsonl(d / "sub" / "b.jsonl", [{"text": "b"}])
    (d / "notes.md").write_text("ignored")
    assert resolve_files(str(d)) == [a, b]
    assert resolve_files(str(d / "*.jsonl")) == [a]
    assert resolve_files([b, str(d / "**" / "*.jsonl")]) == [b, a]
    assert len(load_raw(str(d), cache_dir=cache)) == 2
    with pytest.raises(DataError, match="no such file"):
        resolve_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="glob matches no files"):
        resolve_files(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_files(str(d / "notes.md"))
    with pytest.raises(DataError, match="mixes file types"):
        resolve_files([a, SHAKESPEARE])

    pq, js = str(tmp_path / "x.parquet"), str(tmp_path / "x.json")
    datasets.Dataset.from_dict({"text": ["p1", "p2"]}).to_parquet(pq)
    with open(js, "w") as f:
        json.dump([{"text": "j1"}, {"text": "j2"}, {"text": "j3"}], f)
    assert list(load_raw(pq, cache_dir=cache)["text"]) == ["p1", "p2"]
    assert list(load_raw(js, cache_dir=cache)["text"]) == ["j1", "j2", "j3"]
    with open(js, "w") as f:
        f.write('[{"text": "j1"},\n {"text": }]')
    with pytest.raises(DataError, match=r"x\.json:2: not valid JSON"):
        load_raw(js, cache_dir=cache)

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(saved))
    assert resolve_files(str(saved)) == [str(saved)]
    assert list(load_raw(str(saved))["text"]) == ["one", "two", "three"]


# ------------------------------------------------------------------------------ chat

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Bot: {{ m['content'] }}{{ eos_token }}"
    "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Bot:{% endif %}"
)


def test_chat_happy_path_only_assistant_turns_are_targets(tok, cache, tmp_path):
    conv = [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello, friend."},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time."},
    ]
    opener = [{"role": "assistant", "content": "Welcome."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": conv[:2]}, {"messages": opener}])
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    train = build_datasets(DataConfig(train=path, format="chat", max_length=128, packing=False), chat_tok,
                           cache_dir=cache).train
    assert len(train) == 3
    opened = [t for t in train[2]["labels"] if t != IGNORE_INDEX]
    assert tok.decode(opened[:-1]).strip() == "Welcome." and opened[-1] == tok.eos_token_id
    row = train[0]
    rendered = chat_tok.apply_chat_template(conv, tokenize=False)
    assert row["input_ids"] == enc(chat_tok, rendered) and row["input_ids"][0] == tok.bos_token_id
    # contiguous target spans == the assistant turns, each ending with EOS
    spans, cur = [], []
    for t, y in zip(row["input_ids"], row["labels"]):
        if y == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert y == t
            cur.append(t)
    if cur:
        spans.append(cur)
    assert [s[-1] for s in spans] == [tok.eos_token_id] * 2
    assert [tok.decode(s[:-1]).strip() for s in spans] == ["Hello, friend.", "Once upon a time."]
    untargeted = tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y == IGNORE_INDEX],
                            skip_special_tokens=True)
    assert "Hi there." in untargeted and "Tell me a story." in untargeted and "friend" not in untargeted


def test_chat_without_template_is_an_error(tok, cache, tmp_path):
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="chat template"):
        build_datasets(DataConfig(train=path, format="chat"), tok, cache_dir=cache)


# ------------------------------------------------------------------------------ vocab

def test_check_vocab(tok):
    check_vocab(tok, 512)
    check_vocab(tok, 1024)
    with pytest.raises(DataError, match="512 tokens but the model's vocabulary has 500"):
        check_vocab(tok, 500)


# ------------------------------------------------------------------------------ eval split

def test_eval_fraction_takes_the_raw_tail(tok, cache):
    cfg = DataConfig(train=SELF_INSTRUCT, format="instruction", max_length=4096, eval_fraction=0.1,
                     packing=False)
    built = build_datasets(cfg, tok, cache_dir=cache)
    train, ev = built.train, built.eval
    assert built.eval_samples[:] == ev[:]  # unpacked: the eval rows are the samples
    assert (len(train), len(ev)) == (157, 18)  # round(175 * 0.1) = 18, no sample is dropped at 4096
    with open(SELF_INSTRUCT) as f:
        lines = [json.loads(x) for x in f]
    for row, src in ((train[0], lines[0]), (train[156], lines[156]), (ev[0], lines[157]), (ev[17], lines[174])):
        targets = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tok.decode(targets[:-1]) == src["output"]
    again = build_datasets(cfg, tok, cache_dir=cache)      # nothing in the build is random
    again, ev2 = again.train, again.eval
    assert again[:] == train[:] and ev2[:] == ev[:]


def test_eval_from_its_own_files(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "ev.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    cfg = DataConfig(train=SELF_INSTRUCT, eval=path, format="instruction", max_length=4096, eval_fraction=0.5,
                     packing=False)
    built = build_datasets(cfg, tok, cache_dir=cache)
    train, ev = built.train, built.eval
    assert len(train) == 175 and len(ev) == 4  # eval set => eval_fraction is not used


# ------------------------------------------------------------------------------ batches

def test_batches_sharded_disjoint_equal_deterministic():
    n, mbs, ws = 103, 4, 2
    assert batches_per_epoch(n, mbs, ws) == 12
    r0 = epoch_batches(n, mbs, 0, ws, seed=7, epoch=0)
    r1 = epoch_batches(n, mbs, 1, ws, seed=7, epoch=0)
    assert len(r0) == len(r1) == 12 and all(len(b) == mbs for b in r0 + r1)
    s0, s1 = {i for b in r0 for i in b}, {i for b in r1 for i in b}
    assert not s0 & s1 and len(s0) == len(s1) == 48 and s0 | s1 <= set(range(n))
    assert r0 == epoch_batches(n, mbs, 0, ws, seed=7, epoch=0)
    assert r0 != epoch_batches(n, mbs, 0, ws, seed=7, epoch=1)
    assert r0 != epoch_batches(n, mbs, 0, ws, seed=8, epoch=0)
    for p in (0, 1, 5, 12):
        assert epoch_batches(n, mbs, 1, ws, seed=7, epoch=3, start=p) == epoch_batches(n, mbs, 1, ws, 7, 3)[p:]
    # one rank with a 2x micro-batch sees the same rows per step as the two ranks together
    one = epoch_batches(n, mbs * ws, 0, 1, seed=7, epoch=0)
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in zip(r0, r1)]
    assert epoch_batches(10, 3, 0, 1, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(DataError, match="fewer than micro_batch_size"):
        epoch_batches(7, 4, 0, 2, seed=0, epoch=0)


def test_collate_pads_right_and_masks(tok, cache, tmp_path):
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}]
    b = collate(rows, pad_id=2)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert b["labels"].tolist() == [[-100, 5, 6], [1, 7, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in b.values())
    assert collate(rows, pad_id=0, max_length=5)["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError):
        collate(rows, pad_id=0, max_length=2)

    path = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": f"Task {i}.", "output": "ok " * i} for i in range(9)])
    train = build_datasets(DataConfig(train=path, format="instruction", max_length=160, packing=False), tok,
                           cache_dir=cache).train
    plan = epoch_batches(train, 4, 1, 2, seed=3, epoch=0)
    batch = get_batch(train, plan[0], pad_token_id(tok))
    lens = [len(train[i]["input_ids"]) for i in plan[0]]
    assert batch["input_ids"].shape == (4, max(lens))
    assert batch["attention_mask"].sum(1).tolist() == lens
    assert batch["input_ids"][0, : lens[0]].tolist() == train[plan[0][0]]["input_ids"]
