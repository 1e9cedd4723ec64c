"""Does an adapter fit a model: the architecture, target names and sizes it was made for.

Also the base model's skeleton on the ``meta`` device (config.json alone, no weights), which the
offline merge and the exports inject into to learn the target slots without loading a weight.
"""
from __future__ import annotations

import torch
from torch import nn

from propulsion_ds.errors import AdapterError
from propulsion_ds.method.propulsion import _require_state, inject


def check_architecture(model: nn.Module, meta: dict, where: str = "adapter", this: str = "this model") -> None:
    """The one architecture check: ``meta`` (an adapter's config) names ``model``'s class."""
    arch = type(model).__name__
    if meta.get("architecture") != arch:
        raise AdapterError(f"{where} was made for {meta.get('architecture')}, {this} is {arch}")


def check_compatible(model: nn.Module, meta: dict, where="adapter") -> None:
    """``model`` (injected) has exactly the adapter's architecture, targets and channel counts."""
    check_architecture(model, meta, where)
    state = _require_state(model)
    ours = {s.name: s.size for s in state.slots}
    theirs = meta["targets"]
    for name, size in theirs.items():
        if name not in ours:
            raise AdapterError(f"{where} targets module {name!r}, which this model does not have "
                               f"(or which this injection does not target)")
        if ours[name] != size:
            raise AdapterError(f"{where} module {name!r} has {size} channels, this model's has {ours[name]}: "
                               f"the adapter was made for a model of other sizes")
    extra = [n for n in ours if n not in theirs]
    if extra:
        raise AdapterError(f"model targets {extra[0]!r}, which the {where} does not contain")


def meta_skeleton(base, trust_remote_code: bool = False) -> nn.Module:
    """The base model's skeleton on the meta device, from its config.json alone (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"cannot read the base model's config from {str(base)!r} ({first})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def injected_skeleton(base, meta: dict, pcfg, trust_remote_code: bool = False) -> nn.Module:
    """``meta_skeleton(base)`` with the adapter's Propulsion injected, checked against ``meta``
    (architecture, target names and sizes): what the offline merge and the exports plan from."""
    model = meta_skeleton(base, trust_remote_code)
    check_architecture(model, meta, this=f"the base model {base}")   # before inject: a clearer message
    try:
        inject(model, pcfg)
    except ValueError as e:
        raise AdapterError(f"adapter's targets do not fit {base}: {e}") from None
    check_compatible(model, meta)
    return model
