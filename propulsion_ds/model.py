"""Tokenizer and frozen base model, built so ZeRO-3 never materialises the whole model on a rank."""
from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Pads are masked out of the loss and attention; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base_model(model_cfg, ds_config: dict):
    """Returns (model, keepalive). Keep ``keepalive`` referenced: transformers holds only a weakref
    to the HfDeepSpeedConfig that makes ``from_pretrained`` build under ``deepspeed.zero.Init``."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    keepalive = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path, dtype=DTYPES[model_cfg.dtype],
        trust_remote_code=model_cfg.trust_remote_code)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no requires_grad and ZeRO-3 hooks stay valid.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def vocab_size(model) -> int:
    emb = model.get_input_embeddings()
    return emb.num_embeddings
