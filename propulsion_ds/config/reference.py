"""The README's config reference: one table of every key, rendered from the schema's metadata.

``markdown()`` is the table; ``replace_block(text)`` puts it between the README's
``<!-- config-reference:start -->`` / ``<!-- config-reference:end -->`` markers
(``launch/config_reference.py`` prints or writes it, ``tests/test_config_reference.py`` checks
that the README holds the current table).
"""
from __future__ import annotations

import json
import typing
from typing import Any, Union

from propulsion_ds.config.schema import Leaf, leaves

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
_WORDS = {int: "integer", float: "number", bool: "true/false", str: "string", list: "list",
          dict: "object", type(None): "null"}


def _type_words(tp: Any) -> str:
    args = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    words = [_WORDS.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a))) for a in args]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _values(leaf: Leaf) -> str:
    meta = leaf.meta
    if meta.get("values"):
        return meta["values"]
    if meta.get("choices"):
        return ", ".join(f"`{c}`" for c in meta["choices"])
    text = _type_words(leaf.type)
    bounds = ", ".join(f"{op} {bound}" for op, bound in meta.get("bounds", ()))
    if bounds:
        text += f", {bounds}"
    if meta.get("not_empty"):
        text += ", not empty"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The reference table, one row per key in schema order, ending with a newline."""
    rows = ["| key | default | values | meaning |", "|---|---|---|---|"]
    for leaf in leaves():
        if not leaf.meta.get("help"):
            raise ValueError(f"config schema: {leaf.path} has no help text (give it option(help=...))")
        rows.append(f"| `{leaf.path}` | `{json.dumps(leaf.default)}` | {_cell(_values(leaf))} | "
                    f"{_cell(leaf.meta['help'])} |")
    return "\n".join(rows) + "\n"


def replace_block(text: str, block: str | None = None) -> str:
    """``text`` with the part between the markers replaced by ``block`` (default: the table)."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"no {START} ... {END} block to replace")
    return f"{head}{START}\n{markdown() if block is None else block}{END}{tail}"


def current_block(text: str) -> str | None:
    """What ``text`` holds between the markers (None when it has no such block)."""
    _, start, rest = text.partition(START)
    block, end, _ = rest.partition(END)
    return block.removeprefix("\n") if start and end else None
