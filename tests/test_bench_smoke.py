"""Smoke tests of bench/: each script runs end to end in its tiny mode and writes its table, JSON
and chart. No wall-clock value is ever asserted (the machine is shared; timings are the bench's
job, not the tests')."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

from bench import speed_report  # noqa: E402  (bench/ is a namespace package under the repository root)


def _run(args, tmp_path, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_speed_quick_writes_table_json_and_chart(tmp_path):
    rows = ["bare", "floor", "propulsion", "lora"]
    out = _run(["bench/speed.py", "--model", "stories260K", "--quick", "--steps", "2", "--rows", *rows],
               tmp_path, timeout=900)
    assert "| row | trainable | optimizer state / rank |" in out
    result = json.loads((tmp_path / "speed_stories260K_quick.json").read_text())
    assert (tmp_path / "speed_stories260K_quick.png").stat().st_size > 0
    assert set(result["rows"]) == set(rows)
    r = result["rows"]
    assert r["floor"]["trainable"] == 1
    assert r["propulsion"]["trainable"] == 3000            # sum of d_out over stories260K's 35 linears
    assert r["lora"]["trainable"] == 46240
    for name in rows:
        assert len(r[name]["step_times_s"]) == 2 and r[name]["median_step_s"] > 0
        assert r[name]["peak_mem_per_rank"] > 0 and len(r[name]["peak_mem_all_ranks"]) == 2
    # ZeRO-3 over 2 ranks: fp32 master + Adam m, v for half of the vector each (+ a 4-byte step).
    assert r["propulsion"]["optimizer_state_bytes_per_rank"] == 12 * 3000 // 2 + 4
    assert r["bare"]["optimizer_state_bytes_per_rank"] == 0
    assert r["lora"]["optimizer_state_bytes_per_rank"] > 10 * r["propulsion"]["optimizer_state_bytes_per_rank"]
    assert set(result["targets"]) >= {"propulsion_le_1.05x_floor", "opt_state_ge_10x_smaller_than_lora",
                                      "memory_le_1.02x_floor", "propulsion_below_both_peft"}


def test_quality_quick_writes_table_json_and_chart(tmp_path):
    out = _run(["bench/quality.py", "--quick", "--steps", "3", "--methods", "prop_k1", "ia3", "full"],
               tmp_path, timeout=600)
    assert "| method | trainable |" in out
    result = json.loads((tmp_path / "quality_quick.json").read_text())
    assert (tmp_path / "quality_curves_quick.png").stat().st_size > 0
    m = result["methods"]
    assert set(m) == {"base", "prop_k1", "ia3", "full"}
    assert m["prop_k1"]["trainable"] == m["ia3"]["trainable"] == 3000
    assert m["full"]["recovered_mean"] == pytest.approx(1.0)
    for name in ("prop_k1", "ia3", "full"):
        assert m[name]["eval_loss_mean"] < m["base"]["eval_loss_mean"]      # 3 steps already help
    # Propulsion with k=1 and IA3 on the same targets are the same function (z = 1 + delta, init
    # z = 1) with the same gradient: with the same LR and data they must land on the same loss.
    assert m["prop_k1"]["eval_loss_mean"] == pytest.approx(m["ia3"]["eval_loss_mean"], rel=1e-4)


CS_SAMPLE = ROOT / "assets" / "data" / "commonsense_sample"


def test_quality_commonsense_quick_json_contract(tmp_path):
    """--task commonsense --quick (stories260K, 2 steps, 3 questions a file): every method in the
    JSON with its trainable count, LR, per-file accuracy in [0, 1] and their mean; table and plot."""
    import torch
    from transformers import AutoModelForCausalLM
    methods = ["base", "prop_k15", "prop_all", "ia3", "lora", "full"]
    out = tmp_path / "cs.json"
    text = _run(["bench/quality.py", "--task", "commonsense", "--quick", "--data-dir", str(CS_SAMPLE),
                 "--json", str(out), "--methods", *methods], tmp_path, timeout=600)
    assert "| method | trainable | LR |" in text
    assert out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    m = result["methods"]
    assert list(m) == methods
    stems = {f"{n}_dev" for n in ("boolq", "arc_easy", "arc_challenge", "openbookqa")}
    for name, r in m.items():
        assert isinstance(r["trainable"], int) and isinstance(r["lr"], float)
        assert set(r["accuracy"]) == stems
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["mean_accuracy"] == pytest.approx(sum(r["accuracy"].values()) / len(stems))
        assert r["std"] == 0.0                                  # one seed
        # the per-question record (the paired comparison's input) says what the accuracy says
        (qid, bits), = r["per_seed_correct"].values()
        assert set(bits) == stems and len(qid) == 16
        for f, b in bits.items():
            assert len(b) == 3 and b.count("1") / len(b) == pytest.approx(r["accuracy"][f])
    # trainable counts from the model itself: the scale methods train one value per output channel
    # of every decoder linear (the "All" variant adds the embedding's and lm_head's channels).
    model = AutoModelForCausalLM.from_pretrained(str(ROOT / "assets" / "stories260K"), dtype=torch.float32)
    linears = [mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n]
    channels = sum(mod.out_features for mod in linears)
    cfg = model.config
    assert m["base"]["trainable"] == 0 and m["base"]["lr"] == 0.0
    assert m["prop_k15"]["trainable"] == m["ia3"]["trainable"] == channels
    assert m["prop_all"]["trainable"] == channels + cfg.hidden_size + cfg.vocab_size
    assert m["lora"]["trainable"] == sum(8 * (mod.in_features + mod.out_features) for mod in linears)
    assert m["full"]["trainable"] == sum(p.numel() for p in model.parameters())
    assert m["prop_k15"]["lr"] > 0 and m["ia3"]["lr"] > m["prop_k15"]["lr"]   # IA3 needs ~k x the LR


def test_quality_commonsense_sweep_picks_best_dev_lr_then_seeds(tmp_path):
    """--sweep: the grid runs on seed 0, the LR with the best dev mean accuracy is kept, the other
    seeds run at it, and std is the spread of the per-seed means."""
    import statistics
    out = tmp_path / "sweep.json"
    _run(["bench/quality.py", "--task", "commonsense", "--quick", "--data-dir", str(CS_SAMPLE), "--json", str(out),
          "--methods", "ia3", "--sweep", "--seeds", "2"], tmp_path, timeout=600)
    r = json.loads(out.read_text())["methods"]["ia3"]
    assert len(r["sweep_seed0"]) == 2
    best = max(r["sweep_seed0"].items(), key=lambda kv: kv[1])
    assert r["lr"] == pytest.approx(float(best[0]))
    assert r["seeds"] == [0, 1] and r["per_seed_mean"][0] == pytest.approx(best[1])
    assert r["mean_accuracy"] == pytest.approx(statistics.fmean(r["per_seed_mean"]))
    assert r["std"] == pytest.approx(statistics.stdev(r["per_seed_mean"]))


def test_quality_commonsense_pick_is_best_dev_accuracy_on_seed_0():
    from bench import quality
    runs = [{"lr": 1e-3, "seed": 0, "mean_accuracy": 0.41}, {"lr": 3e-3, "seed": 0, "mean_accuracy": 0.47},
            {"lr": 1e-2, "seed": 0, "mean_accuracy": float("nan")}, {"lr": 1e-3, "seed": 1, "mean_accuracy": 0.9}]
    assert quality.cs_pick(runs) == 3e-3
    tie = [{"lr": 2e-3, "seed": 0, "mean_accuracy": 0.5}, {"lr": 1e-3, "seed": 0, "mean_accuracy": 0.5}]
    assert quality.cs_pick(tie) == 1e-3


def test_quality_commonsense_paired_comparison_on_the_same_questions():
    """Pairs come from the seeds both methods ran on the same questions (the base, deterministic,
    pairs with every seed); the difference is the macro one, averaged over those seeds."""
    from bench import quality

    def m(label, per_seed):
        return {"label": label, "per_seed_correct": {s: [qid, bits] for s, (qid, bits) in per_seed.items()}}
    a0 = {"f1": "1100", "f2": "10"}   # f1 50%, f2 50%
    a1 = {"f1": "1110", "f2": "11"}   # 75%, 100%
    b0 = {"f1": "0001", "f2": "00"}   # 25%, 0%
    b1 = {"f1": "0110", "f2": "01"}   # 50%, 50%
    result = {"methods": {
        "prop_k15": m("P", {"0": ("q", a0), "1": ("q", a1), "2": ("q", a0)}),
        "lora": m("L", {"0": ("q", b0), "1": ("q", b1), "2": ("other questions", b0)}),
        "base": m("B", {"0": ("q", b0)}),
        "ia3": m("I", {"5": ("q", b0)}),          # no seed in common: no row
    }}
    table = quality.cs_paired(result)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert set(rows) == {"P - L", "P - B"}
    # seed 0: (50-25 + 50-0)/2 = 37.5; seed 1: (75-50 + 100-50)/2 = 37.5; seed 2 ran other questions
    assert rows["P - L"][:2] == ["0, 1", "+37.5"]
    assert rows["P - L"][3] == "5 / 1"      # seed 0: 2 + 1 / 1, seed 1: 1 + 1 / 0
    # base against seeds 0, 1, 2: 37.5, (75-25 + 100-0)/2 = 75, 37.5 -> 50
    assert rows["P - B"][:2] == ["0, 1, 2", "+50.0"]
    lo, hi = (float(x) for x in rows["P - B"][2].strip("[]").split(","))
    assert lo <= 50.0 <= hi and lo < hi


def test_quality_commonsense_merges_seeds_from_several_files():
    """--report over per-seed files: one method's seeds pooled when the LR matches (mean and std of
    the per-seed means, times weighted by seeds); another LR is not mixed in."""
    import statistics
    from bench import quality

    def one(seed, acc, lr=1e-3, train_s=60.0):
        return {"lr": lr, "seeds": [seed], "accuracy": acc, "mean_accuracy": statistics.fmean(acc.values()),
                "std": 0.0, "train_s": train_s, "eval_s": 6.0, "per_seed_accuracy": {str(seed): acc}}
    runs = [one(0, {"f1": 0.4, "f2": 0.6}), one(1, {"f1": 0.5, "f2": 0.5}, train_s=120.0),
            one(2, {"f1": 0.3, "f2": 0.3}, train_s=180.0)]
    merged = quality._merge_seeds(quality._merge_seeds(runs[0], runs[1]), runs[2])
    assert merged["seeds"] == [0, 1, 2]
    assert merged["per_seed_mean"] == pytest.approx([0.5, 0.5, 0.3])
    assert merged["mean_accuracy"] == pytest.approx(statistics.fmean([0.5, 0.5, 0.3]))
    assert merged["std"] == pytest.approx(statistics.stdev([0.5, 0.5, 0.3]))
    assert merged["accuracy"] == pytest.approx({"f1": 0.4, "f2": 0.4667}, abs=1e-4)
    assert merged["train_s"] == pytest.approx(120.0)
    other_lr = one(3, {"f1": 0.9, "f2": 0.9}, lr=2e-3)
    assert quality._merge_seeds(merged, other_lr) is merged
    # whole files: one run under another protocol (or an older scoring) is left out, with the reason
    settings = {"model": "m", "steps": 200, "train_rows": 3200, "bf16": True, "scoring": quality.CS_SCORING}
    files = [{"settings": settings, "methods": {"prop_k15": runs[0]}},
             {"settings": settings, "methods": {"prop_k15": runs[1]}},
             {"settings": dict(settings, steps=100), "methods": {"prop_k15": runs[2], "ia3": runs[2]}},
             {"settings": {k: v for k, v in settings.items() if k != "scoring"}, "methods": {"lora": runs[2]}}]
    table, refused = quality.cs_merge(files, ["a", "b", "c", "d"])
    assert set(table["methods"]) == {"prop_k15"} and table["methods"]["prop_k15"]["seeds"] == [0, 1]
    assert refused == ["not merged: c was run under another protocol (steps 100 vs 200)",
                       f"not merged: d was run under another protocol (scoring {quality.CS_SCORING_BEFORE!r} "
                       f"vs {quality.CS_SCORING!r})"]


def test_quality_commonsense_bad_eval_file_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "bench/quality.py", "--task", "commonsense", "--quick",
                           "--data-dir", str(CS_SAMPLE), "--eval-files", str(tmp_path / "nope.jsonl")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"quality.py: --eval-files: {tmp_path / 'nope.jsonl'}: no such file"]


def test_speed_summary_and_table_from_a_fixed_result():
    def row(t, trainable, opt):
        times = [t] * 4
        return {"trainable": trainable, "optimizer_state_bytes_per_rank": opt, "step_times_s": times,
                "median_step_s": t, "cpu_times_s": times, "median_cpu_s": t, "tokens_per_step": 1000.0}
    result = {"model": "m", "settings": {"per_round": 2, "micro_batch": 1, "seq": 8},
              "machine": {"device": "cpu", "ranks": 2},
              "rows": {"bare": row(1.0, 0, 0), "floor": row(2.0, 1, 12), "propulsion": row(2.04, 10, 120),
                       "ia3": row(2.5, 10, 120), "lora": row(3.0, 1000, 12000)}}
    mem = {k: {"peak_per_rank": [100.0, 101.0], "base_per_rank": [50.0, 50.0], "kind": "peak RSS"}
           for k in result["rows"]}
    s = speed_report.summarize(result, mem)
    p = s["rows"]["propulsion"]
    assert p["x_floor"] == pytest.approx(1.02) and p["x_bare"] == pytest.approx(2.04)
    assert p["x_floor_paired"] == pytest.approx(1.02)
    assert s["targets"]["propulsion_le_1.05x_floor"] and s["targets"]["propulsion_below_both_peft"]
    assert s["targets"]["opt_state_ge_10x_smaller_than_lora"] and s["targets"]["memory_le_1.02x_floor"]
    text = speed_report.table(s)
    assert text.count("\n") == 6 and "propulsion-ds k=15" in text


def test_speed_groups_ratio_each_row_to_its_own_floor():
    """--group-size: rows timed in later process groups are compared with the floor timed beside
    them, not with the first group's (the load differs between groups)."""
    from bench import speed
    assert speed.timing_groups(["bare", "floor", "propulsion", "ia3", "lora", "full"], 1) == [
        ["bare", "floor", "propulsion"], ["floor", "ia3"], ["floor", "lora"], ["floor", "full"]]
    assert speed.timing_groups(["floor", "lora", "propulsion"], 2) == [["floor", "propulsion", "lora"]]
    assert speed.timing_groups(["bare", "floor", "lora"], None) == [["bare", "floor", "lora"]]

    def row(t, opt=12):
        times = [t] * 4
        return {"trainable": 1, "optimizer_state_bytes_per_rank": opt, "step_times_s": times, "median_step_s": t,
                "cpu_times_s": times, "median_cpu_s": t, "tokens_per_step": 1000.0}

    def part(rows, load):
        return {"model": "m", "settings": {"per_round": 2, "micro_batch": 1, "seq": 8}, "rows": rows,
                "machine": {"device": "cpu", "ranks": 2, "date": "d", "load_avg_1_5_15": [load] * 3},
                "load_avg_end": load}
    first = part({"bare": row(1.0), "floor": row(2.0), "propulsion": row(2.1, 120)}, 4.0)
    quiet = part({"floor": row(1.0), "lora": row(1.4, 12000)}, 1.0)     # a less loaded machine
    s = speed_report.summarize(speed_report.merge_groups([first, quiet]), None)
    lora, prop = s["rows"]["lora"], s["rows"]["propulsion"]
    assert lora["x_floor"] == pytest.approx(1.4) and lora["x_floor_paired"] == pytest.approx(1.4)
    assert lora["x_bare"] == pytest.approx(1.4 * 2.0 / 1.0)             # through its own group's floor
    assert prop["x_floor"] == pytest.approx(1.05) and s["rows"]["floor"]["median_step_s"] == 2.0
    assert s["targets"]["propulsion_below_both_peft"]                   # 1.05x < 1.4x, though 2.1 s > 1.4 s
    assert [g["rows"] for g in s["groups"]] == [["bare", "floor", "propulsion"], ["floor", "lora"]]
    assert speed_report.table(s).count("\n") == 5


def test_zero_stage_comparison_from_fixed_results():
    """The side-by-side table and the share of the ZeRO-3 floor a replicated base removes."""
    def row(t):
        return {"median_step_s": t, "x_bare": None, "optimizer_state_bytes_per_rank": 16}
    z3 = {"bare": row(1.0), "floor": row(2.2), "propulsion": row(2.25)}
    z2 = {"bare": row(1.0), "floor": row(1.3), "propulsion": row(1.32)}
    for rows in (z3, z2):
        for r in rows.values():
            r["x_bare"] = r["median_step_s"] / rows["bare"]["median_step_s"]
    cmp = speed_report.compare_stages({2: {"rows": z2}, 3: {"rows": z3}})
    assert cmp["floor_overhead_removed"] == pytest.approx((2.2 - 1.3) / (2.2 - 1))
    assert cmp["rows"]["propulsion"]["zero2_over_zero3"] == pytest.approx(1.32 / 2.25)
    assert speed_report.stages_table(cmp).count("\n") == 4


def test_memory_check_compares_planner_with_measured_delta():
    """bench/memory_check.py: the planner's total for the run's own DeepSpeed config against
    (training-steps peak - process baseline); a measurement 5% over passes, 20% over fails."""
    from bench import memory_check
    from propulsion_ds.tools.memory import model_shape
    shape = model_shape(ROOT / "assets/stories260K/config.json")
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
                                "stage3_param_persistence_threshold": 640}}
    plan = memory_check.estimate(shape, ds, 2, "propulsion", 128, 8, 4)
    def result(factor):
        return {"settings": {"seq": 128, "micro_batch": 8}, "dtype": "fp32", "ds_config": ds,
                "machine": {"ranks": 2},
                "rows": {"propulsion": {"train_over_base": factor * plan.total_gpu, "base_all_ranks": [1e8, 1e8],
                                        "train_peak_per_rank": 1e8 + factor * plan.total_gpu}}}
    ok = memory_check.compare({3: result(1.05)}, shape)
    bad = memory_check.compare({3: result(1.20)}, shape)
    assert ok[0]["within"] and not bad[0]["within"]
    assert ok[0]["ratio"] == pytest.approx(1.05)
    assert "| ZeRO-3 | propulsion |" in memory_check.table(ok)


def _moved_off_identity(method):
    """stories260K with ``method`` applied and its trainable values moved off their start (z**15
    within ~15% of 1), so that a layer's adapter left out would show; a packed batch of 3 rows of
    the commonsense sample, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    from bench import common, quality
    from propulsion_ds import data
    mix = quality.cs_train_mix(quality.CS_SAMPLE, 16)
    train, pad, tok = quality.cs_train_data(mix, "text", 256, "stories260K")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(common.model_path("stories260K")), dtype=torch.float32)
    model = quality.apply_method(model, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model, data.get_batch(train, [0, 1, 2], pad), tok


@pytest.mark.parametrize("method", ["prop_k15", "prop_all", "ia3", "lora", "full"])
def test_quality_target_only_loss_equals_the_models_loss_and_gradients(method):
    """The bench's training loss makes logits only at target positions; the loss and every
    trainable gradient equal the model's own (full-logits) loss on packed, varied-length rows."""
    import torch
    from bench import quality
    model, batch, _ = _moved_off_identity(method)
    assert "position_ids" in batch and (batch["position_ids"] == 0).sum() > 3     # several documents a row
    assert 0 < (batch["labels"] != -100).float().mean() < 0.5                      # prompts are not targets
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for loss_fn in (lambda: model(**batch).loss, lambda: quality.target_loss(model, batch)):
        loss = loss_fn()
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (ref, ref_g), (got, got_g) = grads
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["prop_k15", "prop_all", "ia3", "lora"])
def test_quality_scores_the_merged_model_as_the_trained_one(method):
    """The bench scores each trained method after folding its adapter into the weights: the same
    logits (fp32) and the same picks as the adapter applied at run time."""
    import torch
    from transformers import AutoModelForCausalLM
    from bench import common, quality
    from propulsion_ds.eval import choice
    model, batch, tok = _moved_off_identity(method)
    model.eval()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    questions = quality.cs_questions([str(quality.CS_SAMPLE / f"{n}_dev.jsonl") for n in quality.CS_FILES],
                                     "text", None)
    with torch.no_grad():
        ref = model(**batch).logits
    ref_picks = choice.score_questions(model, tok, questions, answer_format="text").picks
    merged = quality.merged_for_scoring(model, method)
    assert not any(p.requires_grad for p in merged.parameters())       # no adapter left
    with torch.no_grad():
        got = merged(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(str(common.model_path("stories260K")), dtype=torch.float32)
    with torch.no_grad():
        assert (base(**batch).logits - ref).abs().max() > 1.0                 # the adapter matters here
    # fp32 rounding of a reordered product only: ~1e-4 on logits up to ~30
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=5e-4)
    assert choice.score_questions(merged, tok, questions, answer_format="text").picks == ref_picks
