"""bench/speed.py's results: ratios to the floors, the targets, the tables and the chart."""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

if __package__:                 # imported as bench.speed_report (the tests)
    from . import common
    from .speed_rows import LABELS, ORDER
else:                           # bench/speed.py runs as a file: bench/ is sys.path[0]
    import common
    from speed_rows import LABELS, ORDER


def merge_groups(parts: list) -> dict:
    """One result from several timing groups: the first group's rows as they are; a later group's
    rows carry their own group's floor (``floor_ref``) for the ratios, and ``groups`` keeps each
    group's rows, date and load."""
    result = copy.deepcopy(parts[0])
    result["groups"] = [{"rows": list(p["rows"]), "date": p["machine"]["date"],
                         "load_avg_1_5_15": p["machine"].get("load_avg_1_5_15"),
                         "load_avg_end": p.get("load_avg_end")} for p in parts]
    for i, part in enumerate(parts[1:], start=1):
        floor = part["rows"]["floor"]
        for name, row in part["rows"].items():
            if name != "floor":
                row["group"] = i
                row["floor_ref"] = {k: floor[k] for k in ("median_step_s", "step_times_s", "median_cpu_s")}
                result["rows"][name] = row
    result.pop("load_avg_end", None)
    return result


def _timing(r: dict, name: str, rows: dict, result: dict) -> None:
    """Ratios of one row's step to the floor timed in the same process group and to bare."""
    bare = rows.get("bare", {}).get("median_step_s")
    floor = rows.get("floor", {}).get("median_step_s")
    per = result["settings"]["per_round"]
    t = r["median_step_s"]
    ref = r.get("floor_ref") or rows.get("floor")    # the floor timed in this row's process group
    r["x_floor_cpu"] = r["median_cpu_s"] / ref["median_cpu_s"] if ref and ref["median_cpu_s"] else None
    if ref:
        # paired: this row's mean step over the floor's in the same round, median over rounds
        ft, rt = ref["step_times_s"], r["step_times_s"]
        ratios = [sum(rt[i:i + per]) / sum(ft[i:i + per]) for i in range(0, len(rt), per)]
        r["x_floor_paired_rounds"] = ratios
        r["x_floor_paired"] = statistics.median(ratios)
    times = sorted(r["step_times_s"])
    r["p25_step_s"], r["p75_step_s"] = times[len(times) // 4], times[(3 * len(times)) // 4]
    r["tokens_per_s"] = r["tokens_per_step"] / t
    peak, n = result.get("peak_flops_per_device"), result.get("n_params")
    r["mfu"] = None
    if peak and n:
        from propulsion_ds.train.metrics import flops_per_token
        world = result["machine"]["ranks"]
        r["mfu"] = flops_per_token(n, trainable_weights=name == "full") * r["tokens_per_s"] / (peak * world)
    # A row timed in a later group reaches bare through its own group's floor (load drifts
    # between groups; within one, the interleaved rounds cancel it).
    r["x_bare"] = (t / ref["median_step_s"] * floor / bare if "floor_ref" in r else t / bare) if bare else None
    r["x_floor"] = t / ref["median_step_s"] if ref else None


def _memory(r: dict, m: dict) -> None:
    """One row's fresh-process memory run: the worst rank's peaks and their rise over its base."""
    r["peak_mem_per_rank"] = max(m["peak_per_rank"])
    r["peak_mem_all_ranks"] = m["peak_per_rank"]
    r["mem_over_base"] = max(p - b for p, b in zip(m["peak_per_rank"], m["base_per_rank"]))
    r["memory_kind"] = m["kind"]
    if "train_peak_per_rank" in m:
        r["train_peak_per_rank"] = max(m["train_peak_per_rank"])
        r["train_peak_all_ranks"] = m["train_peak_per_rank"]
        r["base_all_ranks"] = m["base_per_rank"]
        r["train_over_base"] = max(p - b for p, b in zip(m["train_peak_per_rank"], m["base_per_rank"]))


def _targets(rows: dict) -> dict:
    p = rows["propulsion"]
    targets = {"propulsion_le_1.05x_floor": p["x_floor"] is not None and p["x_floor"] <= 1.05,
               "propulsion_le_1.05x_floor_paired": p.get("x_floor_paired") is not None
               and p["x_floor_paired"] <= 1.05,
               "propulsion_le_1.05x_floor_cpu_time": p["x_floor_cpu"] is not None and p["x_floor_cpu"] <= 1.05}
    # Each row against its own group's floor: rows timed in different groups saw different loads.
    slow = lambda r: r["median_step_s"] if r.get("x_floor") is None else r["x_floor"]   # noqa: E731
    peft = [slow(rows[k]) for k in ("ia3", "lora") if k in rows]
    if peft:
        targets["propulsion_below_both_peft"] = all(slow(p) < t for t in peft)
    if "lora" in rows and p["optimizer_state_bytes_per_rank"]:
        ratio = rows["lora"]["optimizer_state_bytes_per_rank"] / p["optimizer_state_bytes_per_rank"]
        targets["lora_opt_state_over_propulsion"] = ratio
        targets["opt_state_ge_10x_smaller_than_lora"] = ratio >= 10
    if "mem_vs_floor" in p:
        # Read as "costs at most 2% more than the floor"; being lower is better (the floor's
        # scalar on the embedding output makes ZeRO-3 gather the embedding in backward too).
        targets["memory_le_1.02x_floor"] = p["mem_vs_floor"] <= 1.02
        targets["memory_within_2pct_of_floor_both_ways"] = abs(p["mem_vs_floor"] - 1) <= 0.02
    return targets


def summarize(result: dict, memory: dict | None) -> dict:
    """Add the ratios, memory and targets to a timing result (and its memory runs, if any)."""
    rows = result["rows"]
    for name, r in rows.items():
        _timing(r, name, rows, result)
        if memory and name in memory:
            _memory(r, memory[name])
    if memory and "floor" in memory:
        fl = rows["floor"]
        for r in rows.values():
            if "peak_mem_per_rank" in r:
                r["mem_vs_floor"] = r["peak_mem_per_rank"] / fl["peak_mem_per_rank"]
    if "propulsion" in rows:
        result["targets"] = _targets(rows)
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    mem = any("peak_mem_per_rank" in r for r in rows.values())
    kind = next((r["memory_kind"] for r in rows.values() if "memory_kind" in r), "peak RSS")
    headers = ["row", "trainable", "optimizer state / rank", "median step (ms) [p25–p75]", "tokens/s",
               "× bare", "× floor", "× floor, paired", "CPU ms/step", "CPU × floor"]
    mfu = any(r.get("mfu") for r in rows.values())
    if mfu:
        headers.append("MFU")
    train = any("train_peak_per_rank" in r for r in rows.values())
    if mem:
        headers += [f"{kind} / rank", "Δ over process base", "mem × floor"]
    if mem and train:
        headers += ["training-steps peak / rank", "Δ over process base (steps)"]
    out = []
    for name in ORDER:
        if name not in rows:
            continue
        r = rows[name]
        line = [LABELS[name], common.fmt_int(r["trainable"]), common.fmt_bytes(r["optimizer_state_bytes_per_rank"]),
                f"{1e3 * r['median_step_s']:.1f} [{1e3 * r['p25_step_s']:.1f}–{1e3 * r['p75_step_s']:.1f}]",
                f"{r['tokens_per_s']:,.0f}",
                "–" if r["x_bare"] is None else f"{r['x_bare']:.2f}",
                "–" if r["x_floor"] is None else f"{r['x_floor']:.3f}",
                f"{r['x_floor_paired']:.3f}" if r.get("x_floor_paired") is not None else "–",
                f"{1e3 * r['median_cpu_s']:.1f}",
                "–" if r["x_floor_cpu"] is None else f"{r['x_floor_cpu']:.3f}"]
        if mfu:
            line.append("–" if not r.get("mfu") else f"{100 * r['mfu']:.1f} %")
        if mem:
            line += [common.fmt_bytes(r.get("peak_mem_per_rank")), common.fmt_bytes(r.get("mem_over_base")),
                     f"{r['mem_vs_floor']:.3f}" if "mem_vs_floor" in r else "–"]
        if mem and train:
            line += [common.fmt_bytes(r.get("train_peak_per_rank")), common.fmt_bytes(r.get("train_over_base"))]
        out.append(line)
    return common.markdown_table(headers, out)


SHORT = {"bare": "bare fwd+bwd\n(no DeepSpeed)", "floor": "engine floor\n(1 scalar)",
         "propulsion": "propulsion-ds\nk=15", "prop_slice": "propulsion-ds\n(before: slices)",
         "ia3": "peft IA3", "lora": "peft LoRA\nr=8", "full": "full\nfine-tuning"}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in ORDER if r in result["rows"]]
    R = result["rows"]
    med = [1e3 * R[r]["median_step_s"] for r in rows]
    lo = [m - 1e3 * R[r]["p25_step_s"] for m, r in zip(med, rows)]
    hi = [1e3 * R[r]["p75_step_s"] - m for m, r in zip(med, rows)]
    colors = {"bare": "#999999", "floor": "#555555", "propulsion": "#d62728", "prop_slice": "#ff9896",
              "ia3": "#1f77b4", "lora": "#2ca02c", "full": "#9467bd"}
    mem = all("peak_mem_per_rank" in R[r] for r in rows)
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(12 if mem else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    x = range(len(rows))
    ax.bar(x, med, yerr=[lo, hi], color=[colors[r] for r in rows], capsize=4)
    if "floor" in R:
        f = 1e3 * R["floor"]["median_step_s"]
        ax.axhline(f, color="#555555", ls="--", lw=1, label="engine floor")
        ax.axhline(1.05 * f, color="#d62728", ls=":", lw=1, label="1.05 × floor")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(list(x), [SHORT[r] for r in rows], fontsize=7)
    ax.set_ylabel("median step time (ms), bars: p25–p75")
    m, st = result["machine"], result["settings"]
    ax.set_title(f"{result['model']}: ZeRO-{result.get('zero_stage', 3)}, {m['ranks']} ranks, {m['device']}, micro-batch "
                 f"{st['micro_batch']} × {st['seq']} tokens", fontsize=9)
    if mem:
        ax2 = axes[0][1]
        ax2.bar(x, [R[r]["peak_mem_per_rank"] / 2**20 for r in rows], color=[colors[r] for r in rows])
        ax2.set_xticks(list(x), [SHORT[r] for r in rows], fontsize=7)
        ax2.set_ylabel(f"{R[rows[0]].get('memory_kind', 'peak')} per rank (MiB)")
        ax2.set_title("memory, each row in a fresh process group", fontsize=9)
        if "floor" in R:
            ax2.axhline(R["floor"]["peak_mem_per_rank"] / 2**20, color="#555555", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_stages(by_stage: dict) -> dict:
    """ZeRO-2 (replicated frozen base) against ZeRO-3, row by row, each against its own run's bare
    forward+backward; ``floor_overhead_removed``: the share of ZeRO-3's floor-over-bare cost that
    the replicated base does not pay, (x3 - x2) / (x3 - 1) with x = floor / bare."""
    z2, z3 = by_stage[2]["rows"], by_stage[3]["rows"]
    rows = {}
    for name in ORDER:
        if name in z2 and name in z3:
            a, b = z3[name], z2[name]
            rows[name] = {"zero3_ms": 1e3 * a["median_step_s"], "zero2_ms": 1e3 * b["median_step_s"],
                          "zero3_x_bare": a["x_bare"], "zero2_x_bare": b["x_bare"],
                          "zero2_over_zero3": b["median_step_s"] / a["median_step_s"],
                          "zero3_mem": a.get("train_peak_per_rank"), "zero2_mem": b.get("train_peak_per_rank"),
                          "zero3_opt": a["optimizer_state_bytes_per_rank"],
                          "zero2_opt": b["optimizer_state_bytes_per_rank"]}
    out = {"rows": rows}
    f = rows.get("floor")
    if f and f["zero3_x_bare"] and f["zero2_x_bare"] and f["zero3_x_bare"] > 1:
        out["floor_overhead_removed"] = (f["zero3_x_bare"] - f["zero2_x_bare"]) / (f["zero3_x_bare"] - 1)
    return out


def stages_table(cmp: dict) -> str:
    headers = ["row", "ZeRO-3 ms/step", "× bare", "ZeRO-2 ms/step", "× bare", "ZeRO-2 / ZeRO-3",
               "optimizer state / rank Z3 / Z2", "training-steps peak RSS / rank Z3 / Z2"]
    out = []
    for name, r in cmp["rows"].items():
        xb = lambda v: "–" if v is None else f"{v:.2f}"    # noqa: E731
        out.append([LABELS[name], f"{r['zero3_ms']:.0f}", xb(r["zero3_x_bare"]), f"{r['zero2_ms']:.0f}",
                    xb(r["zero2_x_bare"]), f"{r['zero2_over_zero3']:.3f}",
                    f"{common.fmt_bytes(r['zero3_opt'])} / {common.fmt_bytes(r['zero2_opt'])}",
                    f"{common.fmt_bytes(r['zero3_mem'])} / {common.fmt_bytes(r['zero2_mem'])}"])
    return common.markdown_table(headers, out)
