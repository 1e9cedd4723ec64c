"""Train Propulsion vectors on a frozen model with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config configs/llama13b.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json --set train.max_steps=50
    mpirun -np 2 python launch/train.py --config configs/tiny.json
    python launch/train.py --config configs/tiny.json        # one process

Exit codes: 0 done; 2 bad input (config, data, adapter, output dir); 75 preempted by SIGUSR1 /
SIGTERM after writing a checkpoint (resume with --resume); 3 stopped on purpose (diverged).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import fail, setup_logging  # noqa: E402

EXIT_STOPPED = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config JSON (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (repeatable), e.g. --set train.lr=0.01")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in an output_dir that holds a run")
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
    except (ConfigError, DataError, AdapterError, CheckpointError, engine.OutputDirError) as e:
        fail(str(e))
    except engine.Preempted as e:
        fail(str(e), engine.EXIT_PREEMPTED)
    except engine.TrainingError as e:
        fail(str(e), EXIT_STOPPED)
    except OSError as e:
        if e.errno == 28:  # ENOSPC: say so plainly; the previous checkpoint is untouched
            fail(f"disk full while writing under {cfg.output_dir}: {e}; the previous checkpoint is intact")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
