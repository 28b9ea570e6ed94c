"""Pretrain on one process or many.

  python -m pretrain train --config configs/debug.yaml [section.key=value ...]

Rank, world size and rendezvous come from whatever launched us (torchrun, srun, mpirun; see
pretrain/distributed.py).  Exit status: 0 finished, 75 checkpointed after SIGTERM/SIGUSR1 (requeue
me), 1 error, 2 invalid config.  Resumes automatically from the run's latest checkpoint.
"""
from pretrain.commands.config import add_config_arguments

HELP = "pretrain (DeepSpeed ZeRO) from a YAML config"


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    import logging
    import os
    import sys

    from pretrain.config import ConfigError, load_config
    from pretrain.distributed import detect, resolve_master_addr

    dist_env = resolve_master_addr(detect())
    dist_env.export()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    try:
        cfg = load_config(args.config, args.overrides, world_size=dist_env.world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if dist_env.rank == 0 else logging.WARNING,
                        format=f"[rank {dist_env.rank}] %(levelname)s %(name)s: %(message)s")
    from pretrain.trainer import train
    return train(cfg, dist_env)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
