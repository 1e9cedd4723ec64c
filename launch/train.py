"""Train Propulsion vectors on a frozen model with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config configs/llama13b.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json --set train.max_steps=50
    mpirun -np 2 python launch/train.py --config configs/tiny.json
    python launch/train.py --config configs/tiny.json        # one process

Exit codes (each error is one line on stderr, "error: ...", printed once per job, not once per
rank; see docs/RELIABILITY.md "Exit codes"):
  0   done
  1   another rank died or stopped answering (distributed.timeout_minutes); resume with --resume
  2   bad input (config, data, tokenizer, adapter, checkpoint, output dir) or output that cannot be
      written (disk full, permissions); nothing already written is lost
  3   stopped on purpose: train.max_bad_steps non-finite losses/gradients in a row (diverged)
  75  preempted: SIGUSR1 or SIGTERM arrived, a checkpoint was written; resume with --resume
  130 interrupted (Ctrl-C), no checkpoint written
torchrun reports a failed worker as its own exit code 1 and lists the workers' codes in its summary.

How a run ends on every rank (0, 2, 3, 75): after the last collective, all ranks meet at a final
barrier (bounded: at most 60 s, or half of distributed.timeout_minutes), destroy the process group
and exit with the code above. A rank whose peers do not arrive in time (it failed alone, e.g. one
node's data file is bad) leaves at once with its code; under mpirun it ends the MPI job with
MPI_Abort(code), as does a rank that fails before the process group forms, so mpirun exits with
that code. A lost peer (1) and Ctrl-C (130) leave at once, without the barrier.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys


from launch.common import setup_logging
from propulsion_ds.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST, EXIT_USAGE, PropulsionError

SHUTDOWN_TIMEOUT_S = 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config JSON (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (repeatable), e.g. --set train.lr=0.01")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an output_dir that holds a run (removes its checkpoints, adapter, "
                        "metrics and TensorBoard events)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shutdown_timeout_s(cfg) -> float:
    """The final barrier's bound: well below the collective timeout, so that a rank that failed
    alone leaves (and says why) before its peers' collectives time out and blame a lost peer."""
    if cfg is None:
        return SHUTDOWN_TIMEOUT_S
    return max(1.0, min(SHUTDOWN_TIMEOUT_S, cfg.distributed.timeout_minutes * 60.0 / 2))


def _leave_now(code: int) -> None:
    """Exit without Python's teardown: the process group's destructors can abort when it is broken
    or its peers are elsewhere ("terminate called without an active exception", status -6).
    Under mpirun, MPI_Abort(code) instead: mpirun then stops every rank and exits with ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _mpi_initialized():
        from propulsion_ds import distributed as dist

        dist.mpi_abort(code)
    os._exit(code)


def _mpi_initialized() -> bool:
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()


def run(args) -> tuple[int, str | None, object]:
    """Train; returns (exit code, one-line error or None, the config or None). Leaves at once on a
    lost peer or Ctrl-C with a process group."""
    from propulsion_ds.config.load import load_config

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except PropulsionError as e:
        return e.exit_code, str(e), None

    from propulsion_ds.train import recipe

    try:
        recipe.run(cfg, overwrite=args.overwrite)
    except PropulsionError as e:
        return e.exit_code, str(e), cfg
    except KeyboardInterrupt:
        message = "interrupted; no checkpoint written for the current step (resume with --resume)"
        if _group_formed():
            # The other ranks were interrupted too, anywhere in a step: no barrier to meet at.
            print(f"error: {message}", file=sys.stderr, flush=True)
            _leave_now(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED, message, cfg
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else f" (output_dir {cfg.output_dir})"
        hint = "disk full" if e.errno == 28 else (e.strerror or str(e))
        return (EXIT_USAGE, f"input/output error on{where}: {hint}; the newest checkpoint is intact "
                            f"(resume with --resume)", cfg)
    except Exception as e:  # noqa: BLE001
        from propulsion_ds.distributed import is_peer_failure

        if not is_peer_failure(e):
            raise
        from pathlib import Path

        from propulsion_ds.train.checkpoint import latest_step

        step = latest_step(Path(cfg.output_dir) / "checkpoints")
        text = " ".join(str(e).split())[:240]
        print(f"error: lost contact with another rank ({type(e).__name__}: {text}); the job cannot "
              f"continue. Newest checkpoint: {'step_' + str(step) if step is not None else 'none'} "
              f"(resume with --resume)", file=sys.stderr, flush=True)
        # The process group is broken: leave without its destructors.
        _leave_now(EXIT_PEER_LOST)
    return EXIT_OK, None, cfg


def _group_formed() -> bool:
    if "torch" not in sys.modules:           # failed before torch was even imported
        return False
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


_ERROR_KEY = "propulsion_ds/error/"
_SAME_ERROR_WAIT_S = 10.0      # how long a rank waits to see whether rank 0 reports the same error


def _env_ranks() -> tuple[int, int]:
    """(global rank, local rank) from the launcher's environment, before any process group."""
    env = os.environ
    rank = int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", env.get("SLURM_PROCID", "0")))))
    local = env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("SLURM_LOCALID")))
    return rank, rank if local is None else int(local)


def _post_error(message: str | None):
    """(rank, store): this rank's error line (or "") posted under its rank in the rendezvous store,
    so the other ranks can tell whether rank 0 already said the same; store None with one rank."""
    import torch

    rank = torch.distributed.get_rank()
    if torch.distributed.get_world_size() == 1:
        return rank, None
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"{_ERROR_KEY}{rank}", message or "")
    except Exception:  # noqa: BLE001 - a private helper, or a broken store: every rank speaks for itself
        return rank, None
    return rank, store


def _print_error(message: str, rank: int, store) -> None:
    """Rank 0 prints its line. Another rank prints its own, prefixed by its rank, only when rank 0
    did not post the same line within a few seconds (it failed otherwise, or not at all)."""
    if rank == 0 or store is None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    try:
        store.wait([f"{_ERROR_KEY}0"], datetime.timedelta(seconds=_SAME_ERROR_WAIT_S))
        same = store.get(f"{_ERROR_KEY}0").decode() == message
    except Exception:  # noqa: BLE001 - rank 0 is busy elsewhere (a collective) or gone
        same = False
    if not same:
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)


def finish(code: int, message: str | None, cfg=None) -> int:
    """Print the error line (if any), end the process group in order, and return the exit code.

    Returns only for an orderly exit; otherwise leaves the process here (os._exit, MPI_Abort).

    An error line is printed once per job, not once per rank: with a process group, rank 0 prints
    its own and another rank prints only a line rank 0 did not (prefixed "rank N: "). Before the
    group forms every rank of a node ran the same command on the same files, so one rank per node
    speaks (every rank under mpirun, whose ranks may run different commands)."""
    if not _group_formed():
        rank, local_rank = _env_ranks()
        if message and (rank == 0 or local_rank == 0 or "OMPI_COMM_WORLD_RANK" in os.environ
                        or "PMI_RANK" in os.environ):
            print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        from propulsion_ds import distributed as dist

        dist.announce_exit(code, message)   # a rank failing alone: its peers leave with its code
        rank, store = _post_error(message)
        if message:
            _print_error(message, rank, store)
        timeout = shutdown_timeout_s(cfg)
        if dist.shutdown(timeout):
            if code == EXIT_OK:
                # The run's final line (rank 0): nothing may follow it on stderr.
                logging.getLogger("launch.train").info("done: every rank reached the end of the run")
            return code
        if code == EXIT_OK:
            print(f"warning: the run finished, but another rank did not reach the final barrier within "
                  f"{timeout:.0f} s; leaving without tearing down the process group",
                  file=sys.stderr, flush=True)
        _leave_now(code)
    if code != EXIT_OK and _mpi_initialized():
        # Under mpirun, before the process group formed: end the MPI job with this code, rather
        # than wait in MPI_Finalize while the other ranks wait for this one at their rendezvous.
        _leave_now(code)
    return code


def main(argv=None) -> int:
    """0 when the run finished; any other outcome raises SystemExit with its code (as fail() does)."""
    args = parse_args(argv)
    setup_logging()
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        from propulsion_ds import distributed as dist

        dist.init_mpi()     # first, on every rank: from here on a failing rank can MPI_Abort
    code = finish(*run(args))
    if code != EXIT_OK:
        sys.exit(code)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
