"""A raw config dict (as read from JSON) -> RunConfig, checking each value against its annotation.

Unknown keys are refused with a suggestion (a typo, or a key put in the wrong section); an int
given for a float becomes a float, nothing else is converted.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Union

from propulsion_ds.config.messages import fail, got, is_int, is_number, show
from propulsion_ds.errors import ConfigError
from propulsion_ds.config.schema import RunConfig, field_names, leaves

_NO_MATCH = object()


def unknown_key(prefix: str, key: str, known: list[str]) -> str:
    full = prefix + key
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key {full!r} (did you mean {prefix + close[0]!r}?)"
    # A key put in the wrong section: 'lr' at the top level means 'train.lr'.
    ends = {leaf.path: leaf.path.rsplit(".", 1)[-1] for leaf in leaves()}
    close = difflib.get_close_matches(key, list(set(ends.values())), n=1, cutoff=0.8)
    if close:
        where = [p for p, end in ends.items() if end == close[0]]
        return f"unknown key {full!r} (did you mean {' or '.join(repr(p) for p in where)}?)"
    return f"unknown key {full!r} (known keys here: {', '.join(known)})"


def describe(tp) -> str:
    """An annotation in words, for 'expected ...' messages."""
    origin = typing.get_origin(tp)
    if origin is Union:
        parts = [describe(a) for a in typing.get_args(tp)]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    base = origin or tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(
        base, "an object" if dataclasses.is_dataclass(tp) else getattr(tp, "__name__", str(tp)))


def _match_float(value: Any, path: str) -> Any:
    if not is_number(value):
        return _NO_MATCH
    try:
        number = float(value)
    except OverflowError:
        fail(f"{path}: {show(value)} is too large for a number")
    if not math.isfinite(number):
        fail(f"{path}: expected a finite number, {got(value)}")
    return number


def _match(value: Any, tp, path: str) -> Any:
    """``value`` converted to ``tp`` (int -> float only), or _NO_MATCH."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union:
        # Exact types first, so Union[int, float] keeps an int an int.
        for arg in sorted(typing.get_args(tp), key=lambda a: a is float):
            converted = _match(value, arg, path)
            if converted is not _NO_MATCH:
                return converted
        return _NO_MATCH
    if tp is float:
        return _match_float(value, path)
    if (origin or tp) is list:
        if not isinstance(value, list):
            return _NO_MATCH
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_type(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    accepts = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), int: is_int,
               str: lambda v: isinstance(v, str), dict: lambda v: isinstance(v, dict)}.get(origin or tp)
    if accepts is None:
        raise TypeError(f"config schema: unsupported annotation {tp!r} at {path}")
    return value if accepts(value) else _NO_MATCH


def check_type(value: Any, tp, path: str) -> Any:
    converted = _match(value, tp, path)
    if converted is _NO_MATCH:
        fail(f"{path}: expected {describe(tp)}, {got(value)}")
    return converted


def build(raw: Any, cls=RunConfig, prefix: str = ""):
    """The dataclass ``cls`` built from ``raw``; ``prefix`` is the dotted path of ``cls``."""
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        fail(f"{section or 'config'}: expected an object, {got(raw)}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    for key in raw:
        if key not in names:
            fail(unknown_key(prefix, str(key), names))
    kwargs = {}
    for name in (n for n in names if n in raw):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(raw[name], tp, f"{prefix}{name}.")
        else:
            kwargs[name] = check_type(raw[name], tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:       # a section's own __post_init__ (PropulsionConfig)
        msg = str(e)
        if section and not msg.startswith(section):
            first = msg.replace(":", " ").split(" ", 1)[0]
            msg = f"{section}.{msg}" if first in names else f"{section}: {msg}"
        fail(msg)
