"""All stages from one YAML: vocabulary into <out>/tokenizer, shards into <out>/shards.

Flags and section.key=value arguments override the file (e.g. --workers 8 --seq-len 512, or
shards.seq_len=512); relative paths are relative to the current directory.  See
configs/data/demo.yaml and docs/configuration.md.
"""
from __future__ import annotations

from data_prep.commands._common import add_config_flags, config_from_args, reports_errors

HELP = "vocab + shards from a YAML config (flags override it)"


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML file (configs/data/*.yaml)")
    add_config_flags(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of another tokenizer, settings or corpus in <out>/shards")


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import run_all

    run_all(config_from_args(args, args.config), overwrite=args.overwrite)
    return 0
