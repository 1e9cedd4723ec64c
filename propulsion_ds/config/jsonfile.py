"""Read one JSON file (the run config, or the DeepSpeed config it names) with one-line errors."""
from __future__ import annotations

import json
import os
from typing import Any

from propulsion_ds.config.messages import fail, got


def read_json(path: Any, field: str | None) -> Any:
    """Parse a JSON file; errors name ``field`` (or the file, for the run config itself)."""
    what = f"{field}: " if field else ""
    kind = "file" if field else "config file"
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        fail(f"{what}expected a path to a JSON file, {got(path)}")
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        fail(f"{what}{kind} not found: {shown!r}")
    except IsADirectoryError:
        fail(f"{what}{kind} {shown!r} is a directory, expected a JSON file")
    except UnicodeDecodeError as e:
        fail(f"{what}{kind} {shown!r} is not UTF-8 text (byte {e.start})")
    except (OSError, ValueError) as e:          # permissions, name too long, embedded NUL
        fail(f"{what}cannot read {kind} {shown!r}: {getattr(e, 'strerror', None) or e}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{what}{shown}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")
    except (ValueError, RecursionError) as e:   # a number past the int-digits limit, deep nesting
        fail(f"{what}{shown}: invalid JSON: {type(e).__name__}: {e}")
