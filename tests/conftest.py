"""Shared fixtures: the Propulsion core cases, and one local SLURM for the whole session.

The helpers a test calls (ports, the training environment, ``run_cli``, configs, model builders)
are in tests/helpers.py; fixtures pytest hands out are here. Slow tests are marked in their own
file (``pytestmark = pytest.mark.slow``); the fast tier is ``pytest -m "not slow"``.

Shared cases for the Propulsion core tests, in the style of peft's generic tests.

ONE list of architectures (``ARCHS``) × ONE list of configs (``CONFIGS``) gives ``CASES``; each
check in test_propulsion / test_merge_core / test_adapter runs over every case. Adding an
architecture is one ``Arch(...)`` line; adding a config is one ``Cfg(...)`` line.

What a case expects (which modules are targets, in which order) is written out here from the
architecture's module names, independently of ``propulsion_ds.method.targets``. The float64 reference
(``reference_logits``) applies y * mean_i z_i**k with its own forward hooks, independently of
``propulsion_ds.method.propulsion``.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig,  # noqa: E402
                          LlamaConfig, MistralConfig, Qwen2Config)
from transformers.utils import logging as hf_logging  # noqa: E402

from helpers import SlurmCluster, slurm_why_skip  # noqa: E402
from propulsion_ds.method.propulsion import PropulsionConfig  # noqa: E402

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
STORIES260K = ROOT / "assets" / "stories260K"

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, initializer_range=0.1, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)
LLAMA_TINY = dict(TINY, num_key_value_heads=2)


def _randomize_biases(model: nn.Module) -> nn.Module:
    # Fresh models init biases to 0, which would make "the bias is scaled too" untestable.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _from_config(cfg) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_biases(AutoModelForCausalLM.from_config(cfg))


def _stories() -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32)


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, and its module names as a user would read them."""
    name: str
    build: Callable[[], nn.Module]
    layers: str          # the decoder stack
    linears: tuple       # every linear of one decoder layer, in model order
    attention: tuple     # the attention subset of ``linears``
    pair: tuple          # two suffix targets (the list-of-suffixes config)
    embed: str           # input embedding module
    head: str            # lm_head module

    @property
    def regex(self) -> str:
        # A full-name regex: the ``pair`` modules of decoder layer 1 only.
        return r".*\.1\.(?:.*\.)?(" + "|".join(re.escape(p) for p in self.pair) + ")"


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_ATTN = LLAMA_LINEARS[:4]

ARCHS = [
    Arch("llama", lambda: _from_config(LlamaConfig(**LLAMA_TINY)),
         "model.layers", LLAMA_LINEARS, LLAMA_ATTN, ("q_proj", "v_proj"), "model.embed_tokens", "lm_head"),
    Arch("llama-tied", lambda: _from_config(LlamaConfig(**LLAMA_TINY, tie_word_embeddings=True)),
         "model.layers", LLAMA_LINEARS, LLAMA_ATTN, ("q_proj", "v_proj"), "model.embed_tokens", "lm_head"),
    Arch("stories260K", _stories,
         "model.layers", LLAMA_LINEARS, LLAMA_ATTN, ("q_proj", "v_proj"), "model.embed_tokens", "lm_head"),
    Arch("mistral", lambda: _from_config(MistralConfig(**LLAMA_TINY)),
         "model.layers", LLAMA_LINEARS, LLAMA_ATTN, ("q_proj", "v_proj"), "model.embed_tokens", "lm_head"),
    Arch("qwen2", lambda: _from_config(Qwen2Config(**LLAMA_TINY)),  # q/k/v carry biases
         "model.layers", LLAMA_LINEARS, LLAMA_ATTN, ("q_proj", "v_proj"), "model.embed_tokens", "lm_head"),
    Arch("gpt-neox", lambda: _from_config(GPTNeoXConfig(**TINY)),
         "gpt_neox.layers", ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                             "mlp.dense_4h_to_h"),
         ("attention.query_key_value", "attention.dense"), ("query_key_value", "dense_4h_to_h"),
         "gpt_neox.embed_in", "lm_head"),
    Arch("gpt2", lambda: _from_config(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,  # Conv1D, tied
                                                 n_positions=64, initializer_range=0.1,
                                                 bos_token_id=0, eos_token_id=0)),
         "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
         ("attn.c_attn", "attn.c_proj"), ("c_attn", "mlp.c_proj"), "transformer.wte", "lm_head"),
]
ARCH = {a.name: a for a in ARCHS}


def _suffix_hit(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


@dataclass(frozen=True)
class Cfg:
    """One Propulsion config, and the target names it must select on an architecture."""
    name: str
    make: Callable[[Arch], PropulsionConfig]
    expect: Callable[[Arch, int], list]   # (arch, number of layers) -> names in model order


def _per_layer(a: Arch, n_layers: int, suffixes, layers=None) -> list:
    return [f"{a.layers}.{i}.{s}" for i in (range(n_layers) if layers is None else layers) for s in suffixes]


CONFIGS = [
    Cfg("all-linear", lambda a: PropulsionConfig(),
        lambda a, L: _per_layer(a, L, a.linears)),
    Cfg("attention", lambda a: PropulsionConfig(targets="attention"),
        lambda a, L: _per_layer(a, L, a.attention)),
    Cfg("emb+head", lambda a: PropulsionConfig(embeddings=True, lm_head=True),
        lambda a, L: [a.embed] + _per_layer(a, L, a.linears) + [a.head]),
    Cfg("n4", lambda a: PropulsionConfig(num_vectors=4, degree=7),
        lambda a, L: _per_layer(a, L, a.linears)),
    Cfg("suffixes", lambda a: PropulsionConfig(targets=list(a.pair)),
        lambda a, L: _per_layer(a, L, [s for s in a.linears if _suffix_hit(s, a.pair)])),
    Cfg("regex", lambda a: PropulsionConfig(targets=[a.regex], degree=3),
        lambda a, L: _per_layer(a, L, [s for s in a.linears if _suffix_hit(s, a.pair)], layers=[1])),
    Cfg("bias", lambda a: PropulsionConfig(train_bias=True),
        lambda a, L: _per_layer(a, L, a.linears)),
]

CASES = [pytest.param(a, c, id=f"{a.name}-{c.name}") for a in ARCHS for c in CONFIGS]


@functools.lru_cache(maxsize=None)
def _cached_base(name: str) -> nn.Module:
    return ARCH[name].build().eval()


def base_model(arch: Arch, dtype=torch.float32) -> nn.Module:
    """A fresh copy of the (deterministic) base model, eval mode, in ``dtype``."""
    return copy.deepcopy(_cached_base(arch.name)).to(dtype)


def n_layers(model) -> int:
    return model.config.num_hidden_layers


def is_tied(model) -> bool:
    return model.get_input_embeddings().weight is model.get_output_embeddings().weight


def out_width(module: nn.Module) -> int:
    """d_out read from the weight layout (the tests' own rule, not propulsion_ds')."""
    if isinstance(module, nn.Embedding):
        return module.weight.shape[1]
    if type(module).__name__ == "Conv1D":   # GPT-2: weight is (in, out)
        return module.weight.shape[1]
    return module.weight.shape[0]           # nn.Linear: (out, in)


def token_ids(model, batch=2, length=7, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def random_z(model, names, num_vectors, seed=0, spread=0.03) -> dict:
    """{target: float64 z of shape (num_vectors, d_out)}, uniform in 1 ± spread (not ones)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return {n: 1.0 + (torch.rand(num_vectors, out_width(modules[n]), generator=g, dtype=torch.float64)
                      * 2 - 1) * spread for n in names}


def set_z(model, zs: dict) -> None:
    """Write z into the flat delta: (num_vectors, total_d_out), targets side by side in model order."""
    with torch.no_grad():
        delta = model.propulsion_delta
        delta.copy_(torch.cat([z - 1.0 for z in zs.values()], dim=1).to(delta.dtype))


def reference_model(base: nn.Module, zs: dict, degree: int) -> tuple[nn.Module, dict]:
    """The base model in float64, with hooks y * mean_i z_i**k; returns it and its leaf z's."""
    ref = copy.deepcopy(base).double()
    modules = dict(ref.named_modules())
    leaves = {n: z.clone().requires_grad_(True) for n, z in zs.items()}
    for name, z in leaves.items():
        modules[name].register_forward_hook(lambda m, args, y, z=z: y * (z ** degree).mean(dim=0))
    return ref, leaves


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float64 (same loss for model and reference)."""
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).double(), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="session")
def slurm_local():
    """One real SLURM node with 2 CPUs (scripts/slurm_local.sh), shared by every SLURM test of the
    session and torn down at its end; skipped where it cannot start (not root, no slurm/munge)."""
    why = slurm_why_skip()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster.local()
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.hookimpl(tryfirst=True)     # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(config, items):
    """Run the suite on two workers (pytest-xdist, ``-n 2 --dist loadgroup``) without paying twice
    for what a file shares: every test of a file goes to one worker (its module fixtures are built
    once), and every test on the local SLURM to one worker (one cluster per machine). Slow files
    start first so that the short ones fill in at the end instead of one long file running alone.
    Without xdist the marks are inert and only the order changes."""
    for item in items:
        group = "slurm" if "slurm_local" in getattr(item, "fixturenames", ()) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
