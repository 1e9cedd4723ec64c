"""Run configuration: the schema (dataclasses, ``schema.py``) and, in ``load``, reading, checking
and resolving it (``build``, ``validate``, ``paths``, ``deepspeed``); ``reference`` renders the
README's table of every key from the schema."""
from propulsion_ds.config.schema import *  # noqa: F401,F403
from propulsion_ds.config.schema import RunConfig  # noqa: F401
from propulsion_ds.errors import ConfigError  # noqa: F401
