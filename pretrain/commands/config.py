"""Resolve a config (defaults < YAML and its bases < key=value overrides), validate it, print it.

Examples:
  python -m pretrain config --config configs/bert-base.yaml training.max_steps=100
  python -m pretrain config --config configs/bert-large-phase1.yaml --world-size 8
Exit status 2 with every problem listed when the config is invalid.
"""
HELP = "resolve, validate and print a training config"


def add_config_arguments(parser) -> None:
    """--config FILE and key=value overrides: shared by every command that takes a training config."""
    parser.add_argument("--config", required=True, help="YAML file (may extend another via `base:`)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides, highest precedence (e.g. zero.stage=2 training.max_steps=100)")


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None,
                        help="data-parallel size, to check global = micro x accumulation x world")


def load_or_report(args, world_size, announce: bool = True):
    """The config of ``--config`` and the overrides, its warnings printed once as ``warning: ...``
    lines (where ``announce``: rank 0 of a distributed run); None after printing every problem
    of an invalid one, or a tracker package that is not installed (the command then exits with status 2)."""
    import sys

    from data_prep.settings import collected_warnings
    from pretrain.config import ConfigError, load_config
    from pretrain.trackers import missing_packages

    try:
        with collected_warnings() as warnings:
            cfg = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    missing = missing_packages(cfg.logging.trackers)
    if missing:
        print("\n".join(f"error: {line}" for line in missing), file=sys.stderr)
        return None
    for warning in warnings if announce else []:
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def run(args) -> int:
    import sys

    from pretrain.config import dump_config

    cfg = load_or_report(args, args.world_size)
    if cfg is None:
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0
