"""Helpers shared by bench/speed.py and bench/quality.py: models, data, adapters, tables, machine info."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STORIES = ROOT / "assets" / "stories260K"
SHAKESPEARE = ROOT / "assets" / "data" / "tinyshakespeare.txt"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
DEEPSPEED = {2: ROOT / "configs" / "deepspeed" / "zero2.json", 3: ZERO3}
GSM8K = Path("/work/shared/data/gsm8k_train.jsonl")
GSM8K_SAMPLE = ROOT / "assets" / "data" / "gsm8k_sample.jsonl"

# Every linear of a LLaMA decoder layer: the targets of propulsion-ds's default "all-linear".
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The synthetic ~100M LLaMA of the speed table (random weights): the brief's example shape,
# hidden 768, 12 layers, intermediate 2048, vocab 32000, untied lm_head -> 134M parameters
# (85M in the decoder layers, 24.6M each in the embedding and lm_head).
SYNTH_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                  max_position_embeddings=2048, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)


def quiet() -> None:
    """torch 2.13 + deepspeed print ~86 FutureWarnings per run; transformers/datasets are chatty."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "propulsion_ds"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def synthetic_llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(**SYNTH_100M)


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct directory: $PROPULSION_SMOLLM2, else the last stdout line
    of scripts/fetch_smollm2.sh (its contract; idempotent, instant once cached)."""
    import subprocess
    env = os.environ.get("PROPULSION_SMOLLM2")
    if env:
        return Path(env)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_smollm2.sh")], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"scripts/fetch_smollm2.sh failed (rc {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return Path(lines[-1])


def model_path(name: str) -> Path:
    return smollm2_path() if name == "smollm2" else STORIES


def tokenizer(name: str = "stories260K"):
    from propulsion_ds.model import load_tokenizer
    return load_tokenizer(str(model_path(name)))


def shakespeare(tok, max_length: int, eval_fraction: float = 0.05):
    """(train, eval) of tinyshakespeare through the project's own pipeline, packed to max_length;
    eval is the last ``eval_fraction`` of the file's lines (held-out tail)."""
    from propulsion_ds.config import DataConfig
    from propulsion_ds.data import build_datasets
    cfg = DataConfig(train=str(SHAKESPEARE), format="text", max_length=max_length, packing=True,
                     eval_fraction=eval_fraction)
    built = build_datasets(cfg, tok)
    return built.train, built.eval


def run_config(micro_batch_size: int, max_length: int, dtype: str = "fp32", max_steps: int = 100,
               zero_stage: int = 3):
    """A RunConfig like configs/tiny.json, for resolve_deepspeed (the engine's own DS config)."""
    from propulsion_ds.config.load import config_from_dict
    raw = {"model": {"name_or_path": str(STORIES), "dtype": dtype},
           "data": {"train": str(SHAKESPEARE), "format": "text", "max_length": max_length},
           "train": {"micro_batch_size": micro_batch_size, "max_steps": max_steps, "lr": 1e-3},
           "deepspeed": str(DEEPSPEED[zero_stage])}
    return config_from_dict(raw, check_files=False)


def ia3_config():
    """peft IA3 on the same 7 linears, all scaled on the OUTPUT side.

    peft's IA3 scales the *input* of modules listed in ``feedforward_modules`` (the IA3 paper's
    rule for the FFN's second matrix) and the *output* of the others. Propulsion scales every
    target's output, so ``feedforward_modules=[]``: the same modules, the same per-output-channel
    vectors, the same trainable count (sum of d_out); IA3 is then z**1 applied by a wrapper layer.
    """
    from peft import IA3Config
    return IA3Config(task_type="CAUSAL_LM", target_modules=list(LLAMA_LINEARS), feedforward_modules=[])


def lora_config(r: int = 8):
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                      target_modules=list(LLAMA_LINEARS))


def count_trainable(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_rss_bytes() -> int:
    """VmHWM: peak RSS since the process started or since ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine(device: str, world: int, backend: str) -> dict:
    import torch
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device,
            "ranks": world, "backend": backend, "cpu_cores": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "load_avg_1m": load_average(),
            "load_avg_1_5_15": _loads()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import deepspeed
        import peft
        import transformers
        info.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


def _loads():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_note(load, cores) -> str:
    """'load 1.9 (2 cores)' plus a warning when other work competes for the cores."""
    if load is None:
        return "load unknown"
    note = f"load {load:.2f} on {cores} cores"
    if cores and load > 1.25 * cores:
        note += " — HIGH: other processes shared the cores, timings are inflated and noisy"
    return note


def fmt_int(n) -> str:
    return "–" if n is None else f"{int(n):,}"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
