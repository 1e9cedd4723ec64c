"""Packing on real data and the real stories260K model: a packed document's loss equals its loss
alone (fp32, sdpa and eager), a poisoned neighbour changes nothing, instruction/chat samples are
never split, positions restart, the only padding is a row's tail, plans are deterministic and
resumable. The Llama-2 tokenizer (real, 32k pieces) checks the layout on longer-tailed lengths."""
import copy
import os
import random

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer

from propulsion_ds.config import DataConfig
from propulsion_ds.data import (IGNORE_INDEX, best_fit_decreasing, build_datasets, document_lengths,
                                epoch_batches, get_batch, pad_token_id, real_tokens)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "assets", "data", "tinyshakespeare.txt")
SELF_INSTRUCT = os.path.join(ROOT, "assets", "data", "self_instruct.jsonl")
MODEL_DIR = os.path.join(ROOT, "assets", "stories260K")
LLAMA2_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Bot: {{ m['content'] }}{{ eos_token }}"
    "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Bot:{% endif %}"
)

datasets.disable_progress_bars()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """Real conversations: self-instruct rows as user/assistant turns, some two rounds long."""
    import json
    rows = [json.loads(x) for x in open(SELF_INSTRUCT)]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows[:60]):
            msgs = [{"role": "user", "content": (r["instruction"] + " " + r["input"]).strip()},
                    {"role": "assistant", "content": r["output"][:160]}]
            if i % 3 == 0:
                nxt = rows[i + 1]
                msgs += [{"role": "user", "content": nxt["instruction"]},
                         {"role": "assistant", "content": nxt["output"][:80]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


SHORT_TEMPLATE = "Q: {instruction} {input}\nA: "  # stories260K's 512 pieces make Alpaca's ~200 tokens


def _cfg(fmt, path, L, packing, template=SHORT_TEMPLATE):
    return DataConfig(train=path, format=fmt, max_length=L, packing=packing,
                      template=template if fmt == "instruction" else None)


def _data(fmt, tok, chat_tok, chat_file, L=256):
    if fmt == "text":
        return SHAKESPEARE, tok
    if fmt == "instruction":
        return SELF_INSTRUCT, tok
    return chat_file, chat_tok


def _token_losses(model, batch):
    """Per-token losses (labels aligned with input_ids, shifted here as HF does), -100 -> nan."""
    out = model(**batch, use_cache=False)
    logits = out.logits.float()[:, :-1]
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp(min=0),
                           reduction="none").view(target.shape)
    return torch.where(target == IGNORE_INDEX, torch.full_like(loss, float("nan")), loss)


def _doc_losses(model, batch):
    """{(row, start): (doc token ids, per-target losses)} of every document in a packed batch."""
    tl = _token_losses(model, batch)
    out = {}
    for r in range(batch["input_ids"].shape[0]):
        start = 0
        for n in document_lengths(batch["position_ids"][r].tolist()):
            ids = tuple(batch["input_ids"][r, start:start + n].tolist())
            # targets of this document: the transitions inside it (start .. start+n-2 predict +1)
            losses = tl[r, start:start + n - 1]
            if (batch["labels"][r, start + 1:start + n] != IGNORE_INDEX).any():
                out[(r, start)] = (ids, losses[~torch.isnan(losses)])
            start += n
    return out


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation=request.param, dtype=torch.float32)
    return m.eval()


@pytest.mark.parametrize("fmt", ["text", "instruction", "chat"])
def test_packed_document_loss_equals_its_unpacked_loss(model, fmt, tok, chat_tok, chat_file):
    path, t = _data(fmt, tok, chat_tok, chat_file)
    L = 512
    packed = build_datasets(_cfg(fmt, path, L, True), t).train
    samples = build_datasets(_cfg(fmt, path, L, False), t).train
    by_ids = {tuple(s["input_ids"]): s for s in samples}
    n_docs = [len(document_lengths(p)) for p in packed["position_ids"]]
    rows = sorted(range(len(packed)), key=lambda i: -n_docs[i])[:6]
    assert sum(n_docs[i] for i in rows) >= 16
    batch = get_batch(packed, rows, pad_token_id(t))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    docs = _doc_losses(model, batch)
    assert len(docs) >= 12
    # every target the loss sees lies inside a document: none at a boundary, none on the pad tail
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(len(x) for _, x in docs.values())
    worst = worst_token = 0.0
    checked = 0
    with torch.no_grad():
        for ids, losses in docs.values():
            if fmt == "text" and ids not in by_ids:
                continue  # a max_length piece of a longer document: no unpacked twin to compare
            s = by_ids[ids]  # an instruction/chat document is a whole sample
            alone = {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]])}
            ref = _token_losses(model, alone)[0]
            ref = ref[~torch.isnan(ref)]
            assert ref.shape == losses.shape
            worst = max(worst, abs(float(losses.mean() - ref.mean())))  # the document's loss
            worst_token = max(worst_token, float((losses - ref).abs().max()))
            checked += 1
    assert checked >= 10
    assert worst < 1e-5 and worst_token < 1e-4, (worst, worst_token)


def _poisoned_neighbours(batch, r, vocab, seed=0):
    """Row r with every document but the last replaced by random tokens (same lengths)."""
    g = torch.Generator().manual_seed(seed)
    poisoned = {k: v.clone() for k, v in batch.items()}
    lens = document_lengths(batch["position_ids"][r].tolist())
    last_start = sum(lens[:-1])
    poisoned["input_ids"][r, :last_start] = torch.randint(3, vocab, (last_start,), generator=g)
    return poisoned, last_start, lens[-1]


def test_poisoned_neighbour_does_not_change_a_documents_loss(model, tok):
    packed = build_datasets(_cfg("instruction", SELF_INSTRUCT, 512, True), tok).train
    r = max(range(len(packed)), key=lambda i: len(document_lengths(packed[i]["position_ids"])))
    lens = document_lengths(packed[r]["position_ids"])
    assert len(lens) >= 2 and sum(lens) == len(packed[r]["input_ids"])
    batch = get_batch(packed, [r], pad_token_id(tok))
    poisoned, s, n = _poisoned_neighbours(batch, 0, 512)
    with torch.no_grad():
        clean = _token_losses(model, batch)[0, s:s + n - 1]
        dirty = _token_losses(model, poisoned)[0, s:s + n - 1]
        keep = ~torch.isnan(clean)
        assert keep.sum() > 5
        assert float((clean[keep] - dirty[keep]).abs().max()) < 1e-5
        # the check can see leakage: with an all-ones mask (packed-sequence detection off) the
        # poisoned neighbours do change the last document's loss
        ones = {k: v for k, v in poisoned.items()}
        ones["attention_mask"] = torch.ones_like(batch["input_ids"])
        clean_ones = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
        leak = (_token_losses(model, clean_ones)[0, s:s + n - 1] - _token_losses(model, ones)[0, s:s + n - 1])
        assert float(leak[keep].abs().max()) > 1e-2


@pytest.fixture(scope="module")
def llama_tok():
    return LlamaTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_samples_never_split_positions_restart_padding_only_at_tail(fmt, tok, llama_tok, chat_file):
    t = llama_tok if fmt == "instruction" else copy.deepcopy(llama_tok)
    if fmt == "chat":
        t.chat_template = CHAT_TEMPLATE
    path = SELF_INSTRUCT if fmt == "instruction" else chat_file
    L = 384
    packed = build_datasets(_cfg(fmt, path, L, True), t).train
    samples = build_datasets(_cfg(fmt, path, L, False), t).train
    assert len(packed) < len(samples) / 2
    expected = sorted((tuple(s["input_ids"]), tuple([IGNORE_INDEX] + s["labels"][1:])) for s in samples)
    got = []
    for row in packed:
        assert len(row["input_ids"]) <= L
        start = 0
        for n in document_lengths(row["position_ids"]):
            assert row["position_ids"][start:start + n] == list(range(n))
            got.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    assert sorted(got) == expected  # every sample exactly once, whole, labels intact

    pad = pad_token_id(t)
    plan = epoch_batches(packed, 4, 0, 1, seed=1, epoch=0)
    for idx in plan[:5]:
        b = get_batch(packed, idx, pad)
        assert "attention_mask" not in b
        lens = [len(packed[i]["input_ids"]) for i in idx]
        assert b["input_ids"].shape == (4, max(lens)) and real_tokens(b) == sum(lens)
        for r, n in enumerate(lens):
            assert b["input_ids"][r, :n].tolist() == packed[idx[r]]["input_ids"]
            assert (b["input_ids"][r, n:] == pad).all() and (b["labels"][r, n:] == IGNORE_INDEX).all()
            assert b["position_ids"][r, n:].tolist() == list(range(max(lens) - n))


def test_unpacked_batches_keep_the_attention_mask(tok):
    ds = build_datasets(_cfg("instruction", SELF_INSTRUCT, 256, False), tok).train
    b = get_batch(ds, [0, 1, 2], pad_token_id(tok))
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert real_tokens(b) == sum(len(ds[i]["input_ids"]) for i in range(3))


def test_packing_is_deterministic_and_resumable(tok):
    cfg = _cfg("instruction", SELF_INSTRUCT, 512, True)
    a, b = build_datasets(cfg, tok).train, build_datasets(cfg, tok).train
    assert a[:] == b[:]
    full = epoch_batches(a, 2, 1, 2, seed=5, epoch=2)
    for p in (0, 1, 3, len(full)):
        assert epoch_batches(a, 2, 1, 2, seed=5, epoch=2, start=p) == full[p:]
    pad = pad_token_id(tok)
    resumed = [get_batch(a, idx, pad) for idx in epoch_batches(b, 2, 1, 2, seed=5, epoch=2, start=3)]
    for x, y in zip(resumed, [get_batch(a, idx, pad) for idx in full[3:]]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def _reference_bfd(lengths, cap):
    """Textbook best-fit decreasing: scan every open bin for the tightest fit; ties go to the bin
    touched last (stable sort of the items by decreasing length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room, touched = [], [], []
    for t, i in enumerate(order):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: (room[b], -touched[b]))
        else:
            bins.append([]), room.append(cap), touched.append(t)
            best = len(bins) - 1
        bins[best].append(i)
        room[best] -= lengths[i]
        touched[best] = t
    return bins


def test_best_fit_decreasing_matches_the_textbook_algorithm():
    rnd = random.Random(0)
    for cap in (8, 64, 300):
        for _ in range(20):
            lengths = [rnd.randint(1, cap) if rnd.random() < 0.2 else rnd.randint(1, cap // 4 + 1)
                       for _ in range(rnd.randint(1, 80))]
            got = best_fit_decreasing(lengths, cap)
            assert sorted(i for b in got for i in b) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in b) <= cap for b in got)
            assert got == _reference_bfd(lengths, cap)
    assert best_fit_decreasing([5, 4, 3, 2, 2], 8) == [[0, 2], [1, 3, 4]]


# ------------------------------------------------------------------------------ flash kernels
# flash_attention_2 reads a packed row's documents from position_ids only in a batch of ONE row,
# so model_inputs hands it the micro-batch flattened, with the boundaries as varlen arguments.
# flash_attn does not run here: the arguments are checked against the documents packed, and a
# reference kernel that reads ONLY those arguments (per-segment causal attention) runs the model.
def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's semantics in plain torch: causal attention inside each
    [cu[i], cu[i+1]) segment of the one flattened row, nothing across; the mask is ignored."""
    assert query.shape[0] == 1
    # no arguments: one sequence (a document run alone, the unpacked reference)
    cu = kwargs.get("cu_seq_lens_q", torch.tensor([0, query.shape[2]]))
    assert torch.equal(cu, kwargs.get("cu_seq_lens_k", cu))
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = torch.empty_like(query)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[:, :, a:b] = F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                        is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def packed_micro_batch(tok):
    """Four packed rows holding the most documents, as get_batch collates them, and the samples."""
    L = 512
    packed = build_datasets(_cfg("instruction", SELF_INSTRUCT, L, True), tok).train
    samples = build_datasets(_cfg("instruction", SELF_INSTRUCT, L, False), tok).train
    n_docs = [len(document_lengths(p)) for p in packed["position_ids"]]
    rows = sorted(range(len(packed)), key=lambda i: -n_docs[i])[:4]
    rows.append(rows.pop(0))           # the longest row not first: every row but one has a pad tail
    batch = get_batch(packed, rows, pad_token_id(tok))
    return batch, {tuple(s["input_ids"]): s for s in samples}, sum(n_docs[i] for i in rows)


def _segments(inputs):
    cu = inputs["cu_seq_lens_q"].tolist()
    return list(zip(cu[:-1], cu[1:]))


def test_flash_gets_one_row_and_exactly_the_document_boundaries(packed_micro_batch, tok):
    from propulsion_ds.data.pack import model_inputs

    batch, by_ids, n_docs = packed_micro_batch
    b, t = batch["input_ids"].shape
    assert b == 4 and n_docs >= 12
    inputs = model_inputs(batch, "flash_attention_2")
    assert "attention_mask" not in inputs and inputs["input_ids"].shape == (1, b * t)
    assert inputs["position_ids"].shape == (1, b * t) and inputs["labels"].shape == (1, b * t)
    cu, cu_k = inputs["cu_seq_lens_q"], inputs["cu_seq_lens_k"]
    assert cu.dtype == torch.int32 and torch.equal(cu, cu_k) and cu[0] == 0 and cu[-1] == b * t
    ids, labels, pos = inputs["input_ids"][0], inputs["labels"][0], inputs["position_ids"][0]
    pad = pad_token_id(tok)
    docs = pads = 0
    for a, z in _segments(inputs):
        seg = tuple(ids[a:z].tolist())
        assert pos[a:z].tolist() == list(range(z - a))
        assert labels[a] == IGNORE_INDEX          # no target across a boundary
        if seg in by_ids:                         # exactly one whole sample: no boundary missing or extra
            assert labels[a + 1:z].tolist() == by_ids[seg]["labels"][1:]
            docs += 1
        else:                                     # a row's pad tail: no target, nothing to attend to
            assert set(seg) == {pad} and (labels[a:z] == IGNORE_INDEX).all()
            pads += 1
    assert docs == n_docs and pads == 3
    assert inputs["max_length_q"] == inputs["max_length_k"] == max(z - a for a, z in _segments(inputs))
    # the kernels that isolate documents per row keep the rows
    assert model_inputs(batch, "sdpa") is batch and model_inputs(batch, "eager") is batch


@pytest.fixture(scope="module")
def varlen_model():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("varlen_reference", varlen_reference)
    AttentionMaskInterface.register("varlen_reference", sdpa_mask)
    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="varlen_reference", dtype=torch.float32)
    return m.eval()


def _flat_doc_losses(model, inputs):
    """{doc token ids: per-target losses} of every document of a flattened row."""
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**kw, use_cache=False).logits.float()[0, :-1]
    target = inputs["labels"][0, 1:]
    tl = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    ids = inputs["input_ids"][0]
    return {tuple(ids[a:z].tolist()): tl[a:z - 1][target[a:z - 1] != IGNORE_INDEX] for a, z in _segments(inputs)}


@pytest.mark.parametrize("kernel", ["varlen_reference", "sdpa"])
def test_flattened_micro_batch_document_loss_equals_unpacked(kernel, packed_micro_batch, varlen_model):
    """The flattened micro-batch, run by a kernel reading only cu_seq_lens (as flash_attn's varlen
    function does) and by sdpa (documents found from the one row's positions): every document's
    loss equals its loss alone, and forward_loss_sum over the micro-batch is the documents' sum."""
    from propulsion_ds.data.pack import flatten_packed, model_inputs
    from propulsion_ds.train.loss import forward_loss_sum, token_loss_sum

    batch, by_ids, n_docs = packed_micro_batch
    model = varlen_model if kernel == "varlen_reference" else \
        AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="sdpa", dtype=torch.float32).eval()
    inputs = flatten_packed(batch)
    worst, total_alone, checked = 0.0, 0.0, 0
    with torch.no_grad():
        docs = _flat_doc_losses(model, inputs)
        for ids, losses in docs.items():
            if ids not in by_ids:
                assert len(losses) == 0            # a pad tail
                continue
            s = by_ids[ids]
            ref = _token_losses(model, {"input_ids": torch.tensor([s["input_ids"]]),
                                        "labels": torch.tensor([s["labels"]])})[0]
            ref = ref[~torch.isnan(ref)]
            assert ref.shape == losses.shape
            worst = max(worst, float((losses - ref).abs().max()))
            total_alone += float(ref.sum())
            checked += 1
        packed_sum = float(forward_loss_sum(model, batch))
    assert checked == n_docs
    assert worst < 1e-4, worst
    assert abs(packed_sum - total_alone) < 1e-4 * max(1.0, total_alone), (packed_sum, total_alone)
    if kernel == "varlen_reference":
        # the check can see leakage: one segment for the whole row mixes the documents
        leaky = dict(model_inputs(batch, kernel))
        n = leaky["input_ids"].shape[1]
        leaky["cu_seq_lens_q"] = leaky["cu_seq_lens_k"] = torch.tensor([0, n], dtype=torch.int32)
        with torch.no_grad():
            logits = model(**{k: v for k, v in leaky.items() if k != "labels"}, use_cache=False).logits
        assert abs(float(token_loss_sum(logits, leaky["labels"])) - total_alone) > 1e-2 * total_alone
