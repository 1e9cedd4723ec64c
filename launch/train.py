"""Train Propulsion vectors on a frozen model with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config configs/llama13b.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json --set train.max_steps=50
    mpirun -np 2 python launch/train.py --config configs/tiny.json
    python launch/train.py --config configs/tiny.json        # one process

Exit codes (each error is one line on stderr, "error: ..."; see README.md "Reliability"):
  0   done
  1   another rank died or stopped answering (distributed.timeout_minutes); resume with --resume
  2   bad input (config, data, tokenizer, adapter, checkpoint, output dir) or output that cannot be
      written (disk full, permissions); nothing already written is lost
  3   stopped on purpose: train.max_bad_steps non-finite losses/gradients in a row (diverged)
  75  preempted: SIGUSR1 or SIGTERM arrived, a checkpoint was written; resume with --resume
  130 interrupted (Ctrl-C), no checkpoint written
torchrun reports a failed worker as its own exit code 1 and lists the workers' codes in its summary.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import fail, setup_logging  # noqa: E402

EXIT_STOPPED = 3
EXIT_PEER_LOST = 1
EXIT_INTERRUPTED = 130


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


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from propulsion_ds.config import ConfigError
    from propulsion_ds.config_load import load_config

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        fail(str(e))

    from propulsion_ds import engine
    from propulsion_ds.adapter import AdapterError
    from propulsion_ds.checkpoint import CheckpointError
    from propulsion_ds.data import DataError

    try:
        engine.run(cfg, overwrite=args.overwrite)
    except (ConfigError, DataError, AdapterError, CheckpointError, engine.OutputDirError,
            engine.OutputWriteError) as e:
        fail(str(e))
    except engine.Preempted as e:
        fail(str(e), engine.EXIT_PREEMPTED)
    except engine.TrainingError as e:
        fail(str(e), EXIT_STOPPED)
    except KeyboardInterrupt:
        fail("interrupted; no checkpoint written for the current step (resume with --resume)",
             EXIT_INTERRUPTED)
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else f" (output_dir {cfg.output_dir})"
        hint = "disk full" if e.errno == 28 else (e.strerror or str(e))
        fail(f"input/output error on{where}: {hint}; the newest checkpoint is intact "
             f"(resume with --resume)")
    except Exception as e:  # noqa: BLE001
        from propulsion_ds.checkpoint import is_peer_failure

        if not is_peer_failure(e):
            raise
        from propulsion_ds.checkpoint import latest_step
        from pathlib import Path

        step = latest_step(Path(cfg.output_dir) / "checkpoints")
        text = " ".join(str(e).split())[:240]
        print(f"error: lost contact with another rank ({type(e).__name__}: {text}); the job cannot "
              f"continue. Newest checkpoint: {'step_' + str(step) if step is not None else 'none'} "
              f"(resume with --resume)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The process group is broken: its C++ destructors can abort at interpreter exit
        # ("terminate called without an active exception", status -6). Leave without them.
        os._exit(EXIT_PEER_LOST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
