"""The GPU check behind scripts/gpu_check.sh: every GPU path once, one table at the end.

    bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU (about 5-8 minutes)
    bash scripts/gpu_check.sh --device cpu    # dry run of the same steps on CPU, tiny sizes

Steps (each with its own time limit; a failure is a row in the table, the next step still runs):
  env        torch / CUDA / GPU name / NCCL / flash_attn
  tiny       the default job (configs/tiny.json), one rank under torchrun (NCCL on cuda)
  smollm2    SmolLM2-135M-Instruct (scripts/fetch_smollm2.sh), chat data, bf16 on cuda, one rank
  bench      bench/speed.py --device cuda rows with MFU (SmolLM2, or the synthetic 134M LLaMA
             when SmolLM2 cannot be fetched: the GPU machine may have no network)
  generate   launch/generate.py with the SmolLM2 adapter (on the GPU where generate.py can)
  merge      launch/merge.py, then the merged directory reloaded on the device: logits against
             base+adapter, lm_head still tied to embed_tokens
Exit status: 0 when every step passed, 1 otherwise. Work files: --work (default a temp dir).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ROWS: list[tuple[str, str, float, str]] = []     # (check, status, seconds, result)

# Per-device sizes: the cuda ones fit the whole check in ~8 minutes on one GPU; the cpu ones
# only prove the plumbing.
SIZES = {
    "cuda": dict(tiny_steps=150, smol_steps=40, smol_len=512, smol_mbs=8, smol_dtype="bf16",
                 bench_rows=["bare", "floor", "propulsion", "ia3", "lora", "full"],
                 bench_args=["--rounds", "4", "--warmup", "3", "--memory-rows", "floor", "propulsion"],
                 t_tiny=120, t_smol=240, t_bench=240, t_gen=90, t_merge=150),
    "cpu": dict(tiny_steps=6, smol_steps=3, smol_len=128, smol_mbs=1, smol_dtype="fp32",
                bench_rows=["bare", "floor", "propulsion"],
                bench_args=["--quick", "--steps", "1", "--no-memory"],
                t_tiny=300, t_smol=600, t_bench=900, t_gen=300, t_merge=600),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(cmd, log: Path, timeout: float, extra_env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` with its output in ``log``; (returncode, output). 124 on timeout."""
    e = env()
    e.update(extra_env or {})
    with open(log, "w") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text(errors="replace")


def last_error(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for l in reversed(lines):
        if l.startswith("error:") or "Error" in l:
            return l[:200]
    return (lines[-1] if lines else "(no output)")[:200]


def row(check: str, t0: float, ok: bool, result: str) -> bool:
    ROWS.append((check, "ok" if ok else "FAIL", time.monotonic() - t0, result))
    print(f"[gpu_check] {check}: {'ok' if ok else 'FAIL'} ({time.monotonic() - t0:.0f}s) {result}", flush=True)
    return ok


def torchrun(nproc: int = 1) -> list:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def tb_peak_mb(out: Path) -> float | None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("memory/peak_mb_rank")]
        return max(max(e.value for e in acc.Scalars(t)) for t in tags) if tags else None
    except Exception:  # noqa: BLE001 - a summary figure only
        return None


def run_summary(out: Path) -> str:
    recs = metrics(out)
    train = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_loss" in r]
    if not train:
        return "no metrics"
    tail = train[len(train) // 2:]                 # past warm-up/compile
    tok_s = sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2]
    parts = [f"loss {train[0]['loss']:.3f}->{train[-1]['loss']:.3f}"]
    if len(ev) >= 2:
        parts.append(f"eval {ev[0]['eval_loss']:.3f}->{ev[-1]['eval_loss']:.3f}")
    parts.append(f"{tok_s:,.0f} tok/s")
    mfu = [r["mfu"] for r in tail if r.get("mfu") is not None]
    if mfu:
        parts.append(f"MFU {100 * sorted(mfu)[len(mfu) // 2]:.1f}%")
    peak = tb_peak_mb(out)
    if peak is not None:
        parts.append(f"peak {peak:,.0f} MB")
    return ", ".join(parts)


# --------------------------------------------------------------------------- steps
def step_env(device: str) -> bool:
    t0 = time.monotonic()
    code = ("import torch, importlib.util as u; c = torch.cuda.is_available(); "
            "print(torch.__version__, torch.version.cuda, c, torch.cuda.get_device_name() if c else '-', "
            "'.'.join(map(str, torch.cuda.nccl.version())) if c else '-', "
            "u.find_spec('flash_attn') is not None)")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env())
    if r.returncode != 0:
        return row("env", t0, False, last_error(r.stderr))
    torch_v, cuda_v, avail, name, nccl, flash = r.stdout.split()[:6]
    ok = device == "cpu" or avail == "True"
    return row("env", t0, ok, f"torch {torch_v}, CUDA {cuda_v}, GPU {name}, NCCL {nccl}, flash_attn {flash}"
               + ("" if ok else " (no CUDA device visible)"))


def step_tiny(work: Path, s: dict) -> bool:
    t0 = time.monotonic()
    out = work / "tiny"
    cmd = [*torchrun(1), ROOT / "launch" / "train.py", "--config", ROOT / "configs" / "tiny.json",
           f"--set=output_dir={out}", f"--set=train.max_steps={s['tiny_steps']}", "--overwrite"]
    if s["tiny_steps"] < 50:
        cmd += ["--set=eval.every_steps=3", "--set=checkpoint.every_steps=3"]
    rc, text = run(cmd, work / "tiny.log", s["t_tiny"])
    return row("tiny (configs/tiny.json, 1 rank)", t0, rc == 0, run_summary(out) if rc == 0 else f"rc {rc}: {last_error(text)}")


def fetch_smollm2(work: Path) -> tuple[Path | None, str]:
    if os.environ.get("PROPULSION_SMOLLM2"):
        p = Path(os.environ["PROPULSION_SMOLLM2"])
        return (p, "") if (p / "config.json").is_file() else (None, f"PROPULSION_SMOLLM2={p} has no config.json")
    rc, text = run(["bash", ROOT / "scripts" / "fetch_smollm2.sh"], work / "fetch.log", 600)
    if rc != 0:
        return None, last_error(text)
    return Path(text.strip().splitlines()[-1]), ""


def chat_data(path: Path) -> int:
    """The 175 Self-Instruct seed tasks as one-turn chats (trained in the model's own template)."""
    rows = [json.loads(l) for l in (ROOT / "assets" / "data" / "self_instruct.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for r in rows:
            user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": r["output"]}]}) + "\n")
    return len(rows)


def step_smollm2(work: Path, s: dict, model: Path | None, why: str, device: str) -> Path | None:
    t0 = time.monotonic()
    if model is None:
        row(f"smollm2 train ({s['smol_dtype']})", t0, False, f"no model: {why}")
        return None
    out = work / "smol"
    chat_data(work / "chat.jsonl")
    cfg = {"model": {"name_or_path": str(model), "dtype": s["smol_dtype"]},
           "propulsion": {"degree": 15, "targets": "all-linear"},
           "data": {"train": str(work / "chat.jsonl"), "format": "chat", "max_length": s["smol_len"],
                    "packing": True, "eval_fraction": 0.1},
           "train": {"lr": 5e-4, "warmup_steps": 2, "schedule": "cosine", "max_steps": s["smol_steps"],
                     "micro_batch_size": s["smol_mbs"], "seed": 0},
           "eval": {"every_steps": max(1, s["smol_steps"] // 2), "max_batches": 8},
           "checkpoint": {"every_steps": 1000}, "output_dir": str(out),
           "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json")}
    (work / "smol.json").write_text(json.dumps(cfg, indent=1))
    rc, text = run([*torchrun(1), ROOT / "launch" / "train.py", "--config", work / "smol.json", "--overwrite"],
                   work / "smol.log", s["t_smol"])
    ok = rc == 0 and (out / "adapter" / "propulsion.safetensors").is_file()
    backend = "nccl" if device == "cuda" else "gloo"
    row(f"smollm2 train ({s['smol_dtype']}, ZeRO-3, 1 rank {backend}, len {s['smol_len']})", t0, ok,
        run_summary(out) if ok else f"rc {rc}: {last_error(text)}")
    return out / "adapter" if ok else None


def step_bench(work: Path, s: dict, device: str, have_smollm2: bool) -> bool:
    t0 = time.monotonic()
    model = "smollm2" if have_smollm2 else "synth100m"
    cmd = [PY, ROOT / "bench" / "speed.py", "--device", device, "--model", model, "--nproc", "1",
           "--rows", *s["bench_rows"], *s["bench_args"], "--out-dir", work / "bench"]
    rc, text = run(cmd, work / "bench.log", s["t_bench"])
    files = sorted((work / "bench").glob(f"speed_{model}*.json")) if (work / "bench").is_dir() else []
    if rc != 0 or not files:
        return row(f"bench/speed.py --device {device} ({model})", t0, False, f"rc {rc}: {last_error(text)}")
    res = json.loads(files[0].read_text())
    row(f"bench/speed.py --device {device} ({model}, {res.get('dtype', '?')})", t0, True,
        f"{len(res['rows'])} rows; GPU {res['machine'].get('gpu', '-')}")
    for name, r in res["rows"].items():
        mem = r.get("train_peak_per_rank") or r.get("peak_mem_per_rank")
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        x_floor = "-" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
        ROWS.append((f"  bench: {name}", "", 0.0,
                     f"{1e3 * r['median_step_s']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, "
                     f"x floor {x_floor}" + ("" if mem is None else f", peak {mem / 2**20:,.0f} MB")))
    return True


def step_generate(work: Path, s: dict, model: Path | None, adapter: Path | None, device: str) -> bool:
    t0 = time.monotonic()
    if adapter is None:
        return row("generate (adapter)", t0, False, "no adapter (smollm2 step failed)")
    help_text = subprocess.run([PY, ROOT / "launch" / "generate.py", "--help"], capture_output=True, text=True,
                               env=env()).stdout
    cmd = [PY, ROOT / "launch" / "generate.py", "--model", model, "--adapter", adapter,
           "--prompt", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "--max-new-tokens", "24", "--dtype", s["smol_dtype"]]
    where = "cpu (generate.py has no --device)"
    if "--device" in help_text:
        cmd += ["--device", device]
        where = device
    elif device == "cuda":
        where = "its default device (no --device flag)"
    rc, text = run(cmd, work / "generate.log", s["t_gen"])
    answer = " ".join(text.split("assistant")[-1].split())[:80] if rc == 0 else ""
    return row(f"generate ({s['smol_dtype']}, on {where})", t0, rc == 0,
               repr(answer) if rc == 0 else f"rc {rc}: {last_error(text)}")


VERIFY = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from propulsion_ds.method.adapter import load_adapter
base, adapter, merged, device = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(base)
ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."},
                               {"role": "assistant", "content": "Red, green and blue."}],
                              return_tensors="pt", return_dict=True)["input_ids"].to(device)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    m = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).to(device).eval()
    tied = m.lm_head.weight is m.model.embed_tokens.weight
    r = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval(), adapter)
    with torch.no_grad():
        a, b = m(input_ids=ids).logits.float(), r(input_ids=ids).logits.float()
    out[str(dtype).split(".")[-1]] = {"rel": float((a - b).abs().max() / b.abs().max()),
                                      "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                                      "tied": tied}
print(json.dumps(out))
"""


def step_merge(work: Path, s: dict, model: Path | None, adapter: Path | None, device: str) -> bool:
    t0 = time.monotonic()
    if adapter is None:
        return row("merge", t0, False, "no adapter (smollm2 step failed)")
    merged = work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    rc, text = run([PY, ROOT / "launch" / "merge.py", "--base", model, "--adapter", adapter, "--out", merged,
                    "--no-progress"], work / "merge.log", s["t_merge"] / 2)
    if rc != 0:
        return row("merge", t0, False, f"rc {rc}: {last_error(text)}")
    (work / "verify.py").write_text(VERIFY)
    rc, vtext = run([PY, work / "verify.py", model, adapter, merged, device], work / "verify.log", s["t_merge"] / 2)
    if rc != 0:
        return row("merge + reload on " + device, t0, False, f"rc {rc}: {last_error(vtext)}")
    v = json.loads(vtext.strip().splitlines()[-1])
    f32, b16 = v["float32"], v["bfloat16"]
    ok = f32["rel"] <= 1e-5 and f32["tied"] and b16["tied"] and f32["argmax_agree"] == 1.0
    return row(f"merge + reload on {device}", t0, ok,
               f"fp32 rel logit diff {f32['rel']:.1e}, bf16 {b16['rel']:.1e} (argmax agree "
               f"{100 * b16['argmax_agree']:.0f}%), lm_head tied {f32['tied']}")


def table() -> str:
    lines = ["| check | status | s | result |", "|---|---|---:|---|"]
    for check, status, secs, result in ROWS:
        lines.append(f"| {check} | {status} | {'' if not status else f'{secs:.0f}'} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run with tiny sizes")
    ap.add_argument("--work", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tiny", "smollm2", "bench", "generate", "merge"])
    args = ap.parse_args(argv)
    s = SIZES[args.device]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    ok = step_env(args.device)
    if not ok and args.device == "cuda":
        print(table())
        print("gpu_check: no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 1
    if "tiny" not in args.skip:
        ok &= step_tiny(work, s)
    model, why = fetch_smollm2(work)
    adapter = None
    if "smollm2" not in args.skip:
        adapter = step_smollm2(work, s, model, why, args.device)
        ok &= adapter is not None
    if "bench" not in args.skip:
        ok &= step_bench(work, s, args.device, model is not None)
    if "generate" not in args.skip:
        ok &= step_generate(work, s, model, adapter, args.device)
    if "merge" not in args.skip:
        ok &= step_merge(work, s, model, adapter, args.device)
    gpu = next((r[3].split("GPU ")[1].split(",")[0] for r in ROWS if r[0] == "env"), "-")
    print(f"\n### gpu_check on {gpu} ({args.device}), {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.monotonic() - t_all:.0f} s in all; logs in {work}\n")
    print(table())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
