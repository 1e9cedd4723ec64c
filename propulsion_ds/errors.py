"""Every error the product reports on purpose, and the exit code each one ends a command with.

An entry point catches `PropulsionError` once, prints `error: <message>` (one line) and exits with
`exit_code`. Each class keeps the builtin base it always had (ValueError, RuntimeError) so callers
that caught those still do. No torch import here: entry points read the exit codes before torch loads.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_PEER_LOST = 1        # another rank died or stopped answering; resume with --resume
EXIT_VERIFY = 1           # merge: the merged model's logits differ from base + adapter
EXIT_USAGE = 2            # bad input, or output that cannot be written; one "error: ..." line
EXIT_STOPPED = 3          # stopped on purpose: diverged (train.max_bad_steps)
EXIT_PREEMPTED = 75       # EX_TEMPFAIL: checkpoint written on SIGUSR1/SIGTERM; resume me
EXIT_INTERRUPTED = 130    # Ctrl-C, no checkpoint written


class PropulsionError(Exception):
    """Base of every error with a one-line message meant for the user."""
    exit_code = EXIT_USAGE


class ConfigError(PropulsionError, ValueError):
    """A bad run config; the message is one line naming the field."""


class DataError(PropulsionError, ValueError):
    """Bad training data; the message is one line naming the file (and line for JSONL)."""


class AdapterError(PropulsionError, ValueError):
    """An adapter file that cannot be used with this model; the message says why."""


class CheckpointError(PropulsionError, RuntimeError):
    """A checkpoint that cannot be written or resumed; the message says which and why."""


class OutputDirError(PropulsionError, ValueError):
    """The output directory holds a run this invocation would overwrite."""


class OutputWriteError(PropulsionError, RuntimeError):
    """Rank 0 could not write metrics or TensorBoard events (disk full, permissions)."""


class TrainingError(PropulsionError, RuntimeError):
    """The run stopped on purpose (diverged, refused); the message says why and what is kept."""
    exit_code = EXIT_STOPPED


class Preempted(PropulsionError):
    """Raised after the preemption checkpoint is written."""
    exit_code = EXIT_PREEMPTED


class StopDuringEval(Preempted):
    """An eval or generation loop saw an agreed stop request between two batches; the recipe
    catches it, checkpoints the current step and raises Preempted with the line to print."""


class MergeError(PropulsionError, ValueError):
    """A merge that cannot run (missing files, wrong adapter, tied weights); one-line message."""


class VerificationError(MergeError):
    """The merged model's logits differ from base+adapter beyond the tolerance."""
    exit_code = EXIT_VERIFY


class ExportError(PropulsionError, ValueError):
    """An export that cannot run (bad input, a setting the target format cannot express)."""


class PlanError(PropulsionError, ValueError):
    """A memory-planner input that cannot be used; the message is one line."""
