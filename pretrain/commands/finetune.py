"""Fine-tune a pretrained encoder: sequence classification or regression, token classification, extractive QA.

  python -m pretrain finetune --config configs/finetune/NAME.yaml [section.key=value ...]
  python -m pretrain finetune --checkpoint DIR --train FILE --dev FILE --out DIR [section.key=value ...]
  python -m pretrain finetune --suite configs/finetune/SUITE.yaml [--checkpoint DIR] [--out DIR] [section.key=value ...]

The short form needs no config file: JSONL or TSV files with the columns `text`, optionally `text_pair`,
and `label`; the task is classification or regression as the labels say (task.type overrides it).  The
flags are config keys (--checkpoint model.checkpoint, --train task.train, --dev task.dev, --out
logging.run_dir, --task task.type) and win over the file and the key=value overrides.

Writes OUT/metrics.json (each seed's dev metrics, their mean and std), OUT/config.yaml and per seed
OUT/seed-N/: metrics.jsonl and tensorboard/ (train loss, lr, dev metrics), predictions.jsonl (one line per
dev example), best/ (the best model, our checkpoint) and hf/ (its transformers export).  The dev metrics
are printed.  An invalid config lists every problem at once.

Rank, world size and rendezvous come from whatever launched us (torchrun, srun, mpirun; see
pretrain/distributed.py).  Exit status: 0 done, 75 checkpointed after SIGTERM, SIGUSR1 or Ctrl-C (requeue
or rerun the same command: it continues, see docs/finetuning.md), 2 invalid config or input (nothing
written), the output directory in use or holding a run of another config, 1 error.  Every key is
documented in pretrain/finetune/config.py; the files in configs/finetune/ show one config per task type.

--suite runs several tasks, one after the other (pretrain/finetune/suite.py: `tasks:`, a list of {name,
config, overrides}); --checkpoint sets every task's model.checkpoint, the command line's overrides apply to
every task after its own, and each task runs in OUT/NAME (OUT: --out, else runs/finetune/SUITE).  Then
OUT/suite.json and OUT/suite.md hold one table: each task's main metric, mean ± std over its seeds, the
seeds' values, and the average of the tasks' means (printed too).  The suite file and every task's config
are checked before anything runs.
"""
from __future__ import annotations

import argparse

HELP = "fine-tune on a classification, regression, token-classification or QA task"


def _flag_keys():
    from data_prep import settings
    from pretrain.finetune.config import FinetuneConfig
    return {dotted: key for dotted, key in settings.keys(FinetuneConfig).items() if key.field.metadata.get("flags")}


FLAG_HELP = {  # the short form's flags, in the order --help shows them
             "model.checkpoint": ("DIR", "the model to start from: our checkpoint directory or a transformers "
                                         "directory"),
             "task.train": ("FILE", "training file (JSONL/TSV/CSV with text, text_pair, label; CoNLL; SQuAD JSON)"),
             "task.dev": ("FILE", "dev file, in the train file's format"),
             "logging.run_dir": ("DIR", "output directory"),
             "task.type": ("TYPE", "auto (classification or regression, from the labels), classification, "
                                   "regression, token, qa")}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML file (may extend another via `base:`); optional")
    parser.add_argument("--suite", default=None, metavar="FILE",
                        help="a suite YAML (tasks: [{name, config, overrides}]): run every task, write "
                             "OUT/suite.json and OUT/suite.md (per-task score, mean ± std, the average)")
    keys = _flag_keys()
    for dotted in sorted(keys, key=lambda k: list(FLAG_HELP).index(k) if k in FLAG_HELP else len(FLAG_HELP)):
        key = keys[dotted]
        metavar, text = FLAG_HELP.get(dotted, (None, key.doc))
        parser.add_argument(key.field.metadata["flags"], dest=dotted, default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{text} [{dotted}]")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (e.g. training.epochs=2 training.seeds=[1,2,3] optimizer.lr=3e-5)")


def run(args) -> int:
    from data_prep.procs import die_with_parent_from_env
    from pretrain.signals import StopSignal
    stop = StopSignal()          # first: a stop request during start-up is kept, not fatal
    die_with_parent_from_env()   # started by a pretraining run for its downstream scores: stop with it

    import dataclasses
    import logging
    import os
    import sys

    from data_prep.settings import ConfigError, collected_warnings
    from pretrain.distributed import detect, free_port, resolve_master_addr

    try:
        dist_env = resolve_master_addr(detect())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop.announce = dist_env.rank == 0
    if dist_env.launcher == "single" and not os.environ.get("MASTER_PORT"):
        dist_env = dataclasses.replace(dist_env, master_port=free_port())
    dist_env.export()
    announce = dist_env.rank == 0
    from pretrain.finetune.config import load_finetune_config
    from pretrain.finetune.suite import SuiteError
    flags = {k: v for k, v in vars(args).items() if k in _flag_keys()}
    try:
        with collected_warnings() as warnings:
            if args.suite:
                suite_out, configs = _suite_configs(args, flags, dist_env.world_size)
            else:
                suite_out = None
                configs = {None: load_finetune_config(args.config, args.overrides, flags,
                                                      world_size=dist_env.world_size)}
    except (ConfigError, SuiteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in warnings if announce else []:
        print(f"warning: {warning}", file=sys.stderr)
    from pretrain.trackers import missing_packages
    missing = sorted({line for cfg in configs.values() for line in missing_packages(cfg.logging.trackers)})
    if missing:
        print("\n".join(f"error: {line}" for line in missing), file=sys.stderr)
        return 2
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO if announce else logging.WARNING,
                        format=f"[rank {dist_env.rank}] %(levelname)s %(name)s: %(message)s")
    from pretrain.finetune.train import METRICS_FILE
    summaries = {}
    for name, cfg in configs.items():
        if announce and name is not None:
            print(f"suite task {name}: {cfg.logging.run_dir}", flush=True)
        code, summary = _finetune(cfg, dist_env, f"suite task {name}: " if name is not None else "", stop)
        if code:
            return code
        if announce:
            _print_summary(summary, os.path.join(cfg.logging.run_dir, METRICS_FILE))
        summaries[name] = summary
    if suite_out is not None and announce:
        from pretrain.finetune.suite import SUITE_JSON, SUITE_MD, format_table, suite_table, write_suite
        table = suite_table(summaries)
        write_suite(suite_out, table)
        print(format_table(table), end="")
        print(f"written to {os.path.join(suite_out, SUITE_JSON)} and {SUITE_MD}")
    return 0


def _finetune(cfg, dist_env, prefix: str, stop) -> tuple[int, dict | None]:
    """One fine-tuning run (the entry point's); (exit status, its summary: None unless done)."""
    import sys

    from pretrain.checkpoint import CheckpointError
    from pretrain.finetune.prepare import FinetuneInputError
    from pretrain.finetune.train import finetune
    from pretrain.trackers import TrackerError
    from pretrain.trainer import EXIT_DONE, EXIT_ERROR, EXIT_REQUEUE, NonFiniteLossError, RunDirError
    try:
        summary = finetune(cfg, dist_env, stop)
        return (EXIT_DONE, summary) if summary is not None else (EXIT_REQUEUE, None)
    except (FinetuneInputError, RunDirError, CheckpointError, TrackerError) as err:
        print(f"error: {prefix}{err}", file=sys.stderr)
        return 2, None
    except NonFiniteLossError as err:
        print(f"error: {prefix}{err}", file=sys.stderr)
        return EXIT_ERROR, None


def _suite_configs(args, flags: dict, world_size: int):
    """(OUT, {task name: its validated config}) of --suite; every problem of the file and the tasks'
    configs raised together as one SuiteError."""
    import os

    from pretrain.finetune.suite import SuiteError, suite_configs
    per_task = sorted(k for k in flags if k not in ("model.checkpoint", "logging.run_dir"))
    if args.config or per_task:
        given = ["--config"] * bool(args.config) + [_flag_keys()[k].field.metadata["flags"] for k in per_task]
        raise SuiteError(f"--suite takes --checkpoint, --out and overrides, not {', '.join(given)} "
                         "(each task's config names its files)")
    out = flags.get("logging.run_dir") or os.path.join(
        "runs", "finetune", os.path.splitext(os.path.basename(args.suite))[0])
    return out, suite_configs(args.suite, args.overrides, flags, out, world_size)


def _print_summary(summary: dict, path: str) -> None:
    def line(values: dict) -> str:
        return "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))

    print(f"dev metrics ({summary['task']}; best model by {summary['metric']}):")
    for seed, values in summary["seeds"].items():
        print(f"  seed {seed}: {line({k: v for k, v in values.items() if k in summary['mean']})}"
              f"  (best at step {values['best_step']})")
    if len(summary["seeds"]) > 1:
        print(f"  mean: {line(summary['mean'])}")
        print(f"  std:  {line(summary['std'])}")
    print(f"written to {path}")
