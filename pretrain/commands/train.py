"""Pretrain on one process or many.

  python -m pretrain train --config configs/debug.yaml [section.key=value ...]

Rank, world size and rendezvous come from whatever launched us (torchrun, srun, mpirun; see
pretrain/distributed.py).  Exit status: 0 finished, 75 checkpointed after SIGTERM, SIGUSR1 or
Ctrl-C (requeue me), 1 error, 2 invalid config or data, or the run directory in use by another
run.  Resumes automatically from the run's latest checkpoint.
"""
from pretrain.commands.config import add_config_arguments, load_or_report

HELP = "pretrain (DeepSpeed ZeRO) from a YAML config"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--stop-after-step", type=int, default=None, metavar="N",
                        help="checkpoint and exit with status 75 after step N (the schedule still "
                             "spans training.max_steps); rerun the same command to continue")
    parser.add_argument("--fault", default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS  # test-only fault injection, e.g. kill-during-save@4


def run(args, prepare=None) -> int:
    """``prepare(cfg, world_size) -> (cfg, trainer.Objective)``: what a run trains where it is not
    pretraining (``pretrain distill``'s); its ConfigError or CheckpointError exits 2."""
    from pretrain.signals import StopSignal
    stop = StopSignal()          # first: a stop request during start-up is kept, not fatal

    import dataclasses
    import logging
    import os
    import sys

    from pretrain.distributed import detect, free_port, resolve_master_addr

    try:
        dist_env = resolve_master_addr(detect())
    except ValueError as err:    # e.g. a malformed SLURM_JOB_NODELIST or a non-integer RANK
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop.announce = dist_env.rank == 0
    if dist_env.launcher == "single" and not os.environ.get("MASTER_PORT"):
        # One process: any free port will do, and a fixed one would collide with another job.
        dist_env = dataclasses.replace(dist_env, master_port=free_port())
    dist_env.export()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    cfg = load_or_report(args, dist_env.world_size, announce=dist_env.rank == 0)
    if cfg is None:
        return 2
    logging.basicConfig(level=logging.INFO if dist_env.rank == 0 else logging.WARNING,
                        format=f"[rank {dist_env.rank}] %(levelname)s %(name)s: %(message)s")
    from pretrain.trainer import EXIT_ERROR, NonFiniteLossError, RunDirError, train
    from pretrain.data import DataError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.trackers import TrackerError
    if prepare is None and cfg.distill.teacher:
        print(f"error: distill.teacher is set ({cfg.distill.teacher}): this is a distillation config, which "
              f"`python -m pretrain train` would not distill; run `python -m pretrain distill` with it",
              file=sys.stderr)
        return 2
    try:
        return train(cfg, dist_env, stop_after_step=args.stop_after_step, fault=args.fault, stop=stop,
                     prepare=prepare)
    except (DataError, CheckpointError, RunDirError, ConfigError, TrackerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
