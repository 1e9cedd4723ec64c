"""Bad input, through the real command lines: one error line naming the thing, exit code 2,
nothing already written is changed.

Each case runs launch/train.py or launch/generate.py in a subprocess (two at a time), reads its
output and compares output_dir before and after. A few checks need no process: the restricted
unpickler refusing a malicious checkpoint file, and grep-level checks that only safetensors and
``torch.load(weights_only=True)`` read files and that ``trust_remote_code`` is off by default.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
GENERATE = str(ROOT / "launch" / "generate.py")
STORIES = ROOT / "assets" / "stories260K"
LLAMA2_TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")
       and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


# --------------------------------------------------------------------------- running cases
@dataclass
class Case:
    name: str
    argv: list
    expect: list                      # substrings of the one error line
    code: int = 2
    watch: Path | None = None         # a directory that must be left exactly as it was
    result: dict = field(default_factory=dict)


def snapshot(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _port(i: int) -> str:
    from helpers import free_port

    return str(free_port())


def run_cases(cases: list[Case], parallel: int = 2) -> None:
    def one(i_case):
        i, case = i_case
        before = snapshot(case.watch)
        env = dict(ENV, MASTER_PORT=_port(i))
        p = subprocess.run([sys.executable, *case.argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        case.result = {"rc": p.returncode, "out": p.stdout + p.stderr, "before": before,
                       "after": snapshot(case.watch)}
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, enumerate(cases)))


def check(case: Case) -> str | None:
    """None if the case behaved, else what went wrong."""
    r = case.result
    text = r["out"].replace("\r", "\n")
    errors = [l for l in text.splitlines() if l.startswith("error: ")]
    problems = []
    if r["rc"] != case.code:
        problems.append(f"exit {r['rc']}, expected {case.code}")
    if "Traceback" in text:
        problems.append("a traceback was printed")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    for needle in case.expect:
        if not any(needle in e for e in errors):
            problems.append(f"no {needle!r} in the error line")
    if r["before"] != r["after"]:
        problems.append(f"{case.watch} changed")
    if problems:
        tail = "\n".join(l for l in text.splitlines() if "Warning" not in l)[-1500:]
        return f"{case.name}: {'; '.join(problems)}\n{tail}"
    return None


def assert_cases(cases: list[Case]) -> None:
    run_cases(cases)
    failures = [f for f in map(check, cases) if f]
    for c in cases:
        errors = [l for l in c.result["out"].replace("\r", "\n").splitlines() if l.startswith("error: ")]
        print(f"[{c.name}] exit {c.result['rc']}: {errors[0] if errors else '(no error line)'}")
    assert not failures, "\n\n".join(failures)


def train(*sets: str, config: str = "configs/tiny.json", flags=()) -> list:
    return [TRAIN, "--config", config, *flags] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((ROOT / "assets" / "data" / "tinyshakespeare.txt").read_text()[:30000])
    return path


# --------------------------------------------------------------------------- config
def test_config_errors(tmp_path):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**json.loads((ROOT / "configs/tiny.json").read_text()), "lr": 0.1}))
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "train": {"lr": 0.1,}\n}\n')
    out = tmp_path / "out"
    cases = [
        Case("unknown key", train("train.lrr=0.1"), ["unknown key 'train.lrr' (did you mean 'train.lr'?)"]),
        Case("unknown key in file", train(config=str(unknown)), ["unknown key 'lr' (did you mean 'train.lr'?)"]),
        Case("wrong type", train("train.max_steps=ten"), ["train.max_steps: expected an integer", "'ten' (str)"]),
        Case("out of range", train("train.lr=-1"), ["train.lr: must be > 0, got -1"]),
        Case("missing config file", train(config=str(tmp_path / "nope.json")), ["config file not found"]),
        Case("invalid JSON", train(config=str(broken)), [f"{broken}:2:", "invalid JSON"]),
        Case("max_steps and epochs", train("train.epochs=2"), ["set max_steps or epochs, not both"]),
        Case("offload needs stage 3", train("deepspeed.zero_optimization.stage=2",
                                            "deepspeed.zero_optimization.offload_param.device=cpu"),
             ["offload_param: offloading to cpu needs ZeRO stage 3"]),
        Case("missing data file", train(f"data.train={tmp_path / 'none.jsonl'}"), ["data.train: file not found"]),
        Case("--resume and --overwrite", train(f"output_dir={out}", flags=("--resume", "--overwrite")),
             ["--resume and --overwrite contradict each other"]),
        Case("--resume without checkpoint", train(f"output_dir={out}", flags=("--resume",)),
             [f"--resume: no complete checkpoint under {out / 'checkpoints'}"]),
    ]
    assert_cases(cases)
    assert not out.exists()


def test_random_json_configs_never_give_a_traceback(tmp_path):
    """Hypothesis-made configs (random JSON, tiny.json with random leaves, random --set values) go
    through launch/train.py's main() (one process, engine.run stubbed so a valid draw does not
    train); three of them also through the real command line."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
    tiny = json.loads((ROOT / "configs" / "tiny.json").read_text())
    leaves = [(s, k) for s, v in tiny.items() if isinstance(v, dict) for k in v] + [(k, None) for k in tiny]
    argvs = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(kind=st.integers(0, 2), value=json_values, leaf=st.sampled_from(leaves),
           override=st.sampled_from(["train.lr", "propulsion.degree", "data.max_length", "checkpoint.keep_last",
                                     "output_dir", "resume", "train.seed", "x", "train.lr.z"]))
    def draw(kind, value, leaf, override):
        path = tmp_path / f"c{len(argvs)}.json"
        if kind == 0:
            path.write_text(json.dumps(value))
            argvs.append(["--config", str(path)])
        elif kind == 1:
            raw = json.loads(json.dumps(tiny))
            section, key = leaf
            if key is None:
                raw[section] = value
            else:
                raw[section][key] = value
            path.write_text(json.dumps(raw))
            argvs.append(["--config", str(path), "--set", f"output_dir={tmp_path / 'never'}"])
        else:
            argvs.append(["--config", "configs/tiny.json", "--set", f"{override}={json.dumps(value)}",
                          "--set", f"output_dir={tmp_path / 'never'}"])
    draw()

    harness = tmp_path / "harness.py"
    harness.write_text(textwrap.dedent(f"""
        import contextlib, io, json, sys, traceback
        sys.path.insert(0, {str(ROOT)!r})
        import launch.train as cli
        from propulsion_ds.train import recipe as engine
        def accepted(cfg, overwrite=False):
            raise SystemExit("accepted")
        engine.run = accepted
        results = []
        for argv in json.load(open(sys.argv[1])):
            err = io.StringIO()
            code, tb = None, None
            with contextlib.redirect_stderr(err):
                try:
                    cli.main(argv)
                except SystemExit as e:
                    code = e.code
                except BaseException:
                    tb = traceback.format_exc()
            results.append({{"argv": argv, "code": code, "stderr": err.getvalue(), "traceback": tb}})
        json.dump(results, sys.stdout)
    """))
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    p = subprocess.run([sys.executable, str(harness), str(tmp_path / "argvs.json")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout)
    assert len(results) == len(argvs)
    accepted = 0
    for r in results:
        assert r["traceback"] is None, f"{r['argv']}: {r['traceback']}"
        if r["code"] == "accepted":
            accepted += 1
            continue
        errors = [l for l in r["stderr"].splitlines() if l.startswith("error: ")]
        assert r["code"] == 2 and len(errors) == 1 and "Traceback" not in r["stderr"], r
    assert accepted < len(results)
    # A few through the real command line, as a user runs it.
    real = [Case(f"random config {i}", [TRAIN, *argv], []) for i, argv in
            enumerate(a for a, r in zip(argvs, results) if r["code"] == 2) if i < 3]
    assert_cases(real)


# --------------------------------------------------------------------------- data
def test_data_errors(tmp_path, small_text):
    bad_line = tmp_path / "bad_line.jsonl"
    bad_line.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    no_output = tmp_path / "no_output.jsonl"
    no_output.write_text("".join(json.dumps({"instruction": f"Say {i}", "input": ""}) + "\n" for i in range(20)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"instruction": "Tell me a long story about a cat and a dog " * 3,
                                        "output": "Once upon a time."}) + "\n" for _ in range(20)))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    common = (f"output_dir={out}", "data.eval_fraction=0")
    cases = [
        Case("malformed JSONL line", train(f"data.train={bad_line}", *common),
             [f"{bad_line}:3: not valid JSON"]),
        Case("missing field", train(f"data.train={no_output}", "data.format=instruction", *common),
             [f"{no_output}: no field 'output' required by format 'instruction'"]),
        Case("empty data set", train(f"data.train={empty}", *common), [f"{empty}: empty data set (no rows)"]),
        Case("every sample too long (instruction masking)",
             train(f"data.train={long}", "data.format=instruction", "data.max_length=8", *common),
             [f"every sample in {long} is longer than max_length=8", "raise data.max_length"]),
        Case("text field missing", train(f"data.train={no_text}", *common), ["no field 'text'"]),
        Case("tokenizer vocabulary does not fit the model",
             train(f"data.train={small_text}", f"tokenizer.name_or_path={LLAMA2_TOKENIZER}", *common),
             ["tokenizer has 32000 tokens but the model's vocabulary has 512"]),
    ]
    assert_cases(cases)
    assert not out.exists()


def test_missing_local_model_directory_is_reported_before_any_hub_lookup(tmp_path):
    """A value that looks like a local path is a missing directory, never a Hub id: ``assets/x``
    (``assets/`` exists here), two slashes, ``./``; ``org/name`` alone may go to the Hub."""
    out = tmp_path / "out"
    cases = [
        Case("first part exists", train("model.name_or_path=assets/smollm2", f"output_dir={out}"),
             ["model.name_or_path: directory not found: 'assets/smollm2'"]),
        Case("two slashes", train("model.name_or_path=models/llama/13b", f"output_dir={out}"),
             ["model.name_or_path: directory not found: 'models/llama/13b'"]),
        Case("./ prefix", train("model.name_or_path=./smollm2", f"output_dir={out}"),
             ["model.name_or_path: directory not found: './smollm2'"]),
        Case("tokenizer", train("tokenizer.name_or_path=assets/nope", f"output_dir={out}"),
             ["tokenizer.name_or_path: directory not found: 'assets/nope'"]),
    ]
    assert_cases(cases)
    assert not out.exists()


@pytest.mark.slow
def test_under_torchrun_an_error_is_printed_once(tmp_path):
    """Two ranks hit the same bad data file: the line appears once (rank 0's), not once per rank."""
    from helpers import run_train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": broken\n')
    r = run_train(["--config", "configs/tiny.json", "--set", f"data.train={bad}", "--set", "data.eval_fraction=0",
                   "--set", f"output_dir={tmp_path / 'out'}", "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                  nproc=2, timeout=300)
    needle = f"{bad}:2: not valid JSON"
    assert r.returncode != 0 and r.stderr.count(needle) == 1, r.stderr[-3000:]
    assert f"error: {needle}" in r.stderr and "rank 1:" not in r.stderr


# --------------------------------------------------------------------------- adapters
def _save_adapter(model, directory: Path) -> Path:
    from propulsion_ds.method.adapter import save_adapter
    from propulsion_ds.method.propulsion import PropulsionConfig, inject

    inject(model, PropulsionConfig())
    return save_adapter(model, directory)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    base = tmp_path_factory.mktemp("adapters")
    good = _save_adapter(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32), base / "good")
    torch.manual_seed(0)
    small_llama = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    other_size = _save_adapter(AutoModelForCausalLM.from_config(small_llama), base / "other_size")
    gpt2 = _save_adapter(AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4)), base / "gpt2")
    return good, other_size, gpt2


def test_adapter_errors(adapters, tmp_path):
    good, other_size, gpt2 = adapters
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    w = truncated / "propulsion.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    garbled = tmp_path / "garbled"
    shutil.copytree(good, garbled)
    g = garbled / "propulsion.safetensors"
    g.write_bytes(b"\xff" * 8 + g.read_bytes()[8:])
    no_config = tmp_path / "no_config"
    shutil.copytree(good, no_config)
    (no_config / "propulsion_config.json").unlink()

    def gen(adapter):
        return [GENERATE, "--model", str(STORIES), "--adapter", str(adapter), "--prompt", "Once",
                "--max-new-tokens", "4"]
    cases = [
        Case("truncated safetensors", gen(truncated), [f"{w} is truncated or corrupted"], watch=truncated),
        Case("corrupted safetensors header", gen(garbled), [f"{g} is truncated or corrupted"], watch=garbled),
        Case("adapter for a model of other sizes", gen(other_size),
             ["adapter module 'model.layers.0.self_attn.q_proj' has 32 channels, this model's has 64"]),
        Case("adapter for another architecture", gen(gpt2),
             ["adapter was made for GPT2LMHeadModel, this model is LlamaForCausalLM"]),
        Case("not an adapter directory", gen(no_config), ["propulsion_config.json not found"]),
    ]
    assert_cases(cases)
    # The good one works through the same path.
    p = subprocess.run([sys.executable, *gen(good)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("Once"), p.stderr[-2000:]


# --------------------------------------------------------------------------- checkpoints, output_dir
@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("trained") / "out"
    p = subprocess.run([sys.executable, *train(f"data.train={small_text}", "data.eval_fraction=0",
                                               "train.max_steps=4", "checkpoint.every_steps=2",
                                               f"output_dir={out}")],
                       cwd=ROOT, env=dict(ENV, MASTER_PORT=_port(0)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "FINISHED").is_file() and (out / "checkpoints" / "step_4" / "meta.json").is_file()
    return out


def test_checkpoint_and_output_dir_errors(trained, small_text, tmp_path):
    common = (f"data.train={small_text}", "data.eval_fraction=0", "train.max_steps=4", "checkpoint.every_steps=2")
    torn = tmp_path / "torn"
    shutil.copytree(trained, torn)
    optim = torn / "checkpoints" / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    ckpt = trained / "checkpoints" / "step_4"
    model_copy = tmp_path / "model_copy"
    shutil.copytree(STORIES, model_copy)
    cases = [
        Case("output_dir is a model directory", train(*common, f"output_dir={model_copy}", flags=("--overwrite",)),
             [f"output_dir {model_copy} holds a config.json that is not a propulsion run config"],
             watch=model_copy),
        Case("finished run, no flag", train(*common, f"output_dir={trained}"),
             [f"output_dir {trained} already holds a finished run: pass --resume to continue or --overwrite"],
             watch=trained),
        Case("resume with another degree", train(*common, f"output_dir={trained}", "propulsion.degree=3",
                                                 flags=("--resume",)),
             [f"checkpoint {ckpt} was written with propulsion=", "'degree': 15", "this run has propulsion=",
              "'degree': 3", "use a new output_dir or the matching config"], watch=trained),
        Case("resume with other targets", train(*common, f"output_dir={trained}", "propulsion.targets=attention",
                                                flags=("--resume",)),
             [f"checkpoint {ckpt} was written with propulsion=", "'targets': 'all-linear'"], watch=trained),
        Case("resume from a truncated checkpoint file", train(*common, f"output_dir={torn}", flags=("--resume",)),
             [f"{optim}: not a readable checkpoint file"], watch=torn),
    ]
    assert_cases(cases)


def test_overwrite_clears_the_previous_run(trained, small_text, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    old_adapter = (out / "adapter" / "propulsion.safetensors").read_bytes()
    p = subprocess.run([sys.executable, *train(f"data.train={small_text}", "data.eval_fraction=0",
                                               "train.max_steps=3", "checkpoint.every_steps=1",
                                               "checkpoint.keep_last=5", "train.lr=0.01", f"output_dir={out}",
                                               flags=("--overwrite",))],
                       cwd=ROOT, env=dict(ENV, MASTER_PORT=_port(0)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    from propulsion_ds.train import checkpoint

    root = out / "checkpoints"
    assert checkpoint.complete_steps(root) == [1, 2, 3]          # the old step_4 is gone
    assert checkpoint.latest_step(root) == 3
    assert (out / "FINISHED").read_text().strip() == "3"
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((root / "step_3" / "meta.json").read_text())["step"] == 3
    assert (out / "adapter" / "propulsion.safetensors").read_bytes() != old_adapter
    assert not [p for p in out.iterdir() if p.name.startswith(".")]    # no trash left behind


# --------------------------------------------------------------------------- what is ever unpickled
def test_checkpoint_files_are_read_with_the_restricted_unpickler(trained, tmp_path):
    """A .pt file that would run code when unpickled is refused before DeepSpeed sees it; a
    checkpoint written for another world size is refused with the reason."""
    import torch
    from propulsion_ds.train import checkpoint

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", ckpt)
    checkpoint.verify_files(ckpt, 4)                              # DeepSpeed's real files pass

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    evil = ckpt / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Evil()}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=r"references posix.system.*refusing to unpickle"):
        checkpoint.verify_files(ckpt, 4)
    assert not (tmp_path / "pwned").exists()

    meta = ckpt / "step_4" / "meta.json"
    raw = json.loads(meta.read_text())
    meta.write_text(json.dumps({**raw, "world_size": 2}))
    split = {k: raw[k] for k in ("train.micro_batch_size", "train.gradient_accumulation_steps", "world_size")}
    with pytest.raises(checkpoint.CheckpointError, match=r"global batch of \d+ samples .* x 2 ranks x .*: "
                                                         r"world_size changed the product"):
        from propulsion_ds.train.checkpointer import check_fingerprint
        check_fingerprint(ckpt, 4, split)


def _python_files():
    for d in ("propulsion_ds", "launch", "bench", "scripts"):
        yield from (ROOT / d).rglob("*.py")


def test_only_safetensors_and_weights_only_torch_load_read_files():
    """grep: every torch.load passes weights_only=True; no pickle, no numpy allow_pickle."""
    offenders = []
    for path in _python_files():
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path}: {m.group(0)}")
        for bad in ("pickle.load", "allow_pickle=True", "dill.", "joblib.load", "weights_only=False"):
            if bad in text:
                offenders.append(f"{path}: {bad}")
    assert not offenders, offenders


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    from propulsion_ds.config import RunConfig

    assert RunConfig().model.trust_remote_code is False
    for path in _python_files():
        assert "trust_remote_code=True" not in path.read_text(), path
