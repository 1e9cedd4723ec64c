"""Run configuration: the schema (dataclasses) and, in `load`, reading, checking and resolving it."""
from propulsion_ds.config.schema import *  # noqa: F401,F403
from propulsion_ds.config.schema import ConfigError, RunConfig  # noqa: F401
