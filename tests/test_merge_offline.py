"""Offline merge (launch/merge.py, propulsion_ds/tools/merge.py) on the real stories260K and on a
sharded, tied tiny LLaMA; the result must load with plain transformers and equal base+adapter."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import MODEL_DIR as STORIES, random_adapter, run_cli, train_env
from propulsion_ds import load_adapter
from propulsion_ds.errors import AdapterError
from propulsion_ds.tools.merge_plan import INDEX_FILE
from propulsion_ds.errors import MergeError
from propulsion_ds.tools.merge import merge

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 403, 9, 77, 310, 52, 11, 250, 4, 499, 128, 3],
                    [1, 17, 200, 45, 90, 301, 7, 8, 66, 480, 2, 31]])


def _cli(*args):
    return run_cli("merge", *args, timeout=180)


def _reference_logits(base, adapter):
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    load_adapter(model, adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """stories260K (untied, embeddings + lm_head + all linears) and a tied, sharded tiny LLaMA."""
    tmp = tmp_path_factory.mktemp("merge")
    stories = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    random_adapter(stories, tmp / "stories_adapter", 1, embeddings=True, lm_head=True)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                      max_position_embeddings=64)
    tiny = LlamaForCausalLM(cfg).eval()
    assert tiny.get_input_embeddings().weight is tiny.get_output_embeddings().weight
    tiny.save_pretrained(tmp / "tiny", max_shard_size="40KB")
    (tmp / "tiny" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    tiny2 = LlamaForCausalLM.from_pretrained(str(tmp / "tiny"), dtype=torch.float32)
    random_adapter(tiny2, tmp / "tiny_adapter", 2, embeddings=True, lm_head=True)
    return tmp


def test_stories260k_cli_merge_loads_with_plain_transformers(work):
    out = work / "stories_merged"
    r = _cli("--base", STORIES, "--adapter", work / "stories_adapter", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "merging" in r.stderr        # tqdm bar over shards
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in STORIES.iterdir())
    assert json.loads((out / "config.json").read_text()) == json.loads((STORIES / "config.json").read_text())

    # the sharded tied model, merged through the library (untie required)
    tiny_out = work / "tiny_merged"
    with pytest.raises(MergeError, match="--untie"):
        merge(work / "tiny", work / "tiny_adapter", tiny_out, verify=False)
    assert not tiny_out.exists()
    res = merge(work / "tiny", work / "tiny_adapter", tiny_out, untie=True, verify=True)
    assert res.untied and res.max_rel_err < 1e-5
    shards = sorted(p.name for p in (work / "tiny").glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(p.name for p in tiny_out.glob("*.safetensors")) == shards
    index = json.loads((tiny_out / INDEX_FILE).read_text())
    assert "lm_head.weight" in index["weight_map"]
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _all_tensors(tiny_out).values())
    assert json.loads((tiny_out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (tiny_out / "tokenizer_config.json").is_file()

    # Load both merged directories in a fresh interpreter that never imports propulsion_ds.
    logits_file = work / "plain_logits.pt"
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({IDS.tolist()})
        out = {{}}
        for name in ("stories_merged", "tiny_merged"):
            m = AutoModelForCausalLM.from_pretrained({str(work)!r} + "/" + name, dtype=torch.float32).eval()
            assert not any(n.startswith("propulsion") for n, _ in m.named_parameters())
            with torch.no_grad():
                out[name] = m(input_ids=ids).logits
            if name == "tiny_merged":
                assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
        assert not any(k.startswith("propulsion_ds") for k in sys.modules), "propulsion_ds imported"
        torch.save(out, {str(logits_file)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=train_env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = torch.load(logits_file)
    assert _rel(_reference_logits(STORIES, work / "stories_adapter"), plain["stories_merged"]) < 1e-5
    assert _rel(_reference_logits(work / "tiny", work / "tiny_adapter"), plain["tiny_merged"]) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(base(input_ids=IDS).logits, plain["stories_merged"]) > 1e-3   # z really merged


def _all_tensors(directory):
    from safetensors.torch import load_file

    out = {}
    for p in Path(directory).glob("*.safetensors"):
        out.update(load_file(str(p)))
    return out


def test_merged_weights_follow_the_formula(work):
    """W' = s[:,None] W, E' = E s[None,:], lm_head' = s_h[:,None] E (untied from E)."""
    from safetensors.torch import load_file

    tiny_out = work / "tiny_merged_formula"
    merge(work / "tiny", work / "tiny_adapter", tiny_out, untie=True, verify=False)
    before, after = _all_tensors(work / "tiny"), _all_tensors(tiny_out)
    z = load_file(str(work / "tiny_adapter" / "propulsion.safetensors"))
    s = {k[:-len(".propulsion")]: v.double() ** 15 for k, v in z.items()}
    q = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(after[q + ".weight"].double(), s[q][:, None] * before[q + ".weight"].double())
    e = before["model.embed_tokens.weight"].double()
    torch.testing.assert_close(after["model.embed_tokens.weight"].double(), e * s["model.embed_tokens"][None, :])
    torch.testing.assert_close(after["lm_head.weight"].double(), s["lm_head"][:, None] * e)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(after[norm], before[norm])                       # untargeted: untouched


def test_bf16_sharded_model_verifies(work, tmp_path):
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf", max_shard_size="20KB")
    m = LlamaForCausalLM.from_pretrained(str(tmp_path / "bf"), dtype=torch.bfloat16)
    random_adapter(m, tmp_path / "ad", 4, targets="attention")
    res = merge(tmp_path / "bf", tmp_path / "ad", tmp_path / "out", verify=True)
    assert res.max_rel_err is not None and res.max_rel_err < 2e-2 and not res.untied
    assert all(t.dtype == torch.bfloat16 for t in _all_tensors(tmp_path / "out").values())


def test_errors_exit_2_with_one_line(work, tmp_path):
    r = _cli("--base", tmp_path / "nope", "--adapter", work / "stories_adapter", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    # an adapter made for stories260K applied to the tiny LLaMA
    r = _cli("--base", work / "tiny", "--adapter", work / "stories_adapter", "--out", tmp_path / "o",
             "--untie", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "channels" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_library_refusals(work, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MergeError, match="not an empty directory"):
        merge(STORIES, work / "stories_adapter", tmp_path / "full")
    res = merge(STORIES, work / "stories_adapter", tmp_path / "full", overwrite=True, verify=False)
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".full.*"))
    with pytest.raises(MergeError, match="must differ"):
        merge(STORIES, work / "stories_adapter", STORIES)
    # an adapter whose architecture differs
    meta = json.loads((work / "stories_adapter" / "propulsion_config.json").read_text())
    other = tmp_path / "other_adapter"
    other.mkdir()
    (other / "propulsion.safetensors").write_bytes((work / "stories_adapter" / "propulsion.safetensors").read_bytes())
    (other / "propulsion_config.json").write_text(json.dumps({**meta, "architecture": "GPT2LMHeadModel"}))
    with pytest.raises(AdapterError, match="GPT2LMHeadModel"):
        merge(STORIES, other, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(AdapterError, match="propulsion_config.json"):
        merge(STORIES, work, tmp_path / "o3")                   # not an adapter directory
