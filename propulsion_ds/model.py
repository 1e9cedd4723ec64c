"""Tokenizer and frozen base model, built so ZeRO-3 never materialises the whole model on a rank.

``model.name_or_path`` is a local directory or a Hugging Face Hub id (``org/name``);
:func:`resolve_model_path` turns an id into its directory in the local Hub cache, downloading it
on global rank 0 only (the other ranks wait at a barrier, then read the cache) unless the user set
``HF_HUB_OFFLINE``. We never set it: tests and the default job pass local directories.

A value that looks like a path (``./x``, ``../x``, ``/x``, ``~/x``, two or more slashes, or
``a/b`` where ``a`` exists here) is never sent to the Hub: a typo in a local path is reported at
once as a missing directory, not after the Hub client's retries.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
from typing import Callable, Optional

import torch

from propulsion_ds.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Files a causal LM never needs from a Hub repo: other frameworks' weights, and the original
# (e.g. Meta's consolidated.*.pth) copies some repos ship beside the transformers ones.
_NEVER = ["original/*", "*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.onnx_data",
          "*.tflite", "*.gguf", "coreml/*", "*.mlmodel", "*.mlpackage/*", "openvino/*"]


def looks_local(value: str) -> bool:
    """True for a value the user meant as a local path: it starts with ``./``, ``../``, ``/`` or
    ``~``, holds a backslash or more than one slash, or is ``a/b`` with ``a`` an existing directory
    (``models/smollm2`` where ``models/`` is here). A Hub id is exactly ``org/name``."""
    if value.startswith(("./", "../", "/", "~", ".\\", "..\\")) or value in (".", "..") or "\\" in value:
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def is_hub_id(value: str) -> bool:
    """``org/name`` that is not an existing local directory and does not look like a local path."""
    return (isinstance(value, str) and bool(HUB_ID.match(value)) and not os.path.isdir(value)
            and not looks_local(value))


def missing_directory(value: str, field: str) -> str:
    """The one-line message for a local path that is not there, naming the deepest part that is."""
    path = os.path.expanduser(value)
    parent = os.path.dirname(os.path.normpath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    there = f"; {parent!r} exists" if parent else ""
    return f"{field}: directory not found: {value!r}{there} (a local model directory, or a Hugging Face Hub id org/name)"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download_ignore_patterns(files: list[str]) -> list[str]:
    """Patterns to skip when downloading a repo holding ``files``: torch .bin/.pth weights are
    skipped when safetensors exist (transformers loads those), so a 7B repo is not fetched twice."""
    patterns = list(_NEVER)
    if any(fnmatch.fnmatch(f, "*.safetensors") for f in files):
        patterns += ["*.bin", "*.pth", "*.pt"]
    return patterns


def _cache_dir() -> Optional[str]:
    # Read now, for the same reason as hub_offline(); None lets huggingface_hub use its default.
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or None


def _from_cache(repo_id: str, revision: Optional[str]) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _download(repo_id: str, revision: Optional[str]) -> str:
    from huggingface_hub import HfApi, snapshot_download

    # model_info fails at once when the Hub is unreachable or the repo does not exist;
    # list_repo_files retries a connection error for ~30 s, which only delays the same answer.
    info = HfApi().model_info(repo_id, revision=revision)
    files = [s.rfilename for s in (info.siblings or [])]
    return snapshot_download(repo_id, revision=revision, cache_dir=_cache_dir(),
                             ignore_patterns=download_ignore_patterns(files))


def resolve_model_path(name_or_path: str, *, rank: int = 0, barrier: Optional[Callable[[], None]] = None,
                       field: str = "model.name_or_path", revision: Optional[str] = None) -> str:
    """The local directory for a model directory or a Hub id.

    A directory is returned as it is. A Hub id is looked up in the local Hub cache
    (``HF_HUB_CACHE``, laid out as ``models--org--name/snapshots/<hash>/``, ``refs/main``). Online
    and not cached, global rank 0 downloads it while the others wait at ``barrier`` (call it on
    every rank: the function always calls it exactly once when given); after the barrier a rank
    whose cache still lacks it (node-local storage) downloads its own copy. Every rank raises the
    same ConfigError naming ``field`` when the model cannot be had, so none hangs at the barrier.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if not is_hub_id(name_or_path):
        raise ConfigError(missing_directory(name_or_path, field))
    offline = hub_offline()
    error = None
    path = _from_cache(name_or_path, revision)
    if path is None and not offline and rank == 0:
        try:
            path = _download(name_or_path, revision)
        except Exception as e:  # noqa: BLE001 - any hub/network failure; reported after the barrier
            error = e
    if barrier is not None:
        barrier()
    if path is None and rank != 0:
        path = _from_cache(name_or_path, revision)
        if path is None and not offline:
            try:
                path = _download(name_or_path, revision)
            except Exception as e:  # noqa: BLE001
                error = e
    if path is None:
        where = _cache_dir() or "the default Hugging Face cache"
        if offline:
            raise ConfigError(f"{field}: {name_or_path!r} is not a local directory, nor in the local Hub "
                              f"cache ({where}), and HF_HUB_OFFLINE is set: download it once online, "
                              f"or pass a local directory")
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error else "not found"
        raise ConfigError(f"{field}: {name_or_path!r} is not a local directory, and cannot download it "
                          f"from the Hugging Face Hub ({reason})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{field}: {name_or_path!r} resolved to {path!r}, which has no config.json")
    return path


def check_attn_implementation(model_cfg) -> None:
    """ConfigError unless ``model.attn_implementation`` can run here (flash_attention_2 needs the
    flash_attn package, a CUDA GPU and a half-precision dtype; sdpa and eager run anywhere)."""
    impl = model_cfg.attn_implementation
    if impl != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash_attn package, "
                          "which is not installed (pip install flash-attn); use sdpa or eager")
    if not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and none is "
                          "visible; use sdpa or eager")
    if model_cfg.dtype not in ("bf16", "fp16"):
        raise ConfigError(f"model.attn_implementation: flash_attention_2 runs in bf16 or fp16, "
                          f"model.dtype is {model_cfg.dtype!r}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Pads are masked out of the loss and attention; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base_model(model_cfg, ds_config: dict, path: Optional[str] = None):
    """Returns (model, keepalive). Keep ``keepalive`` referenced: transformers holds only a weakref
    to the HfDeepSpeedConfig that makes ``from_pretrained`` build under ``deepspeed.zero.Init``.

    ``path``: the directory :func:`resolve_model_path` gave for ``model_cfg.name_or_path`` (default:
    ``name_or_path`` itself, which must then be a directory or already cached)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    check_attn_implementation(model_cfg)
    path = path or resolve_model_path(model_cfg.name_or_path)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    keepalive = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[model_cfg.dtype], trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no requires_grad and ZeRO-3 hooks stay valid.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def vocab_size(model) -> int:
    emb = model.get_input_embeddings()
    return emb.num_embeddings
