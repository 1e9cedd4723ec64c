"""One-line config errors: every problem is a ConfigError whose message names the field."""
from __future__ import annotations

import typing
from typing import Any

from propulsion_ds.errors import ConfigError

# Values come from users, so a message may carry any character: the CLI promises one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def fail(msg: str) -> typing.NoReturn:
    raise ConfigError(msg.translate(_LINE_BREAKS))


def show(value: Any, limit: int = 80) -> str:
    """repr() of a user value, short and on one line (repr escapes line breaks)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):       # an int past Python's str-digits limit, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def got(value: Any) -> str:
    return f"got {show(value)} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
