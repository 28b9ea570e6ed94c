"""All stages from one YAML: vocabulary into <out>/tokenizer, shards into <out>/shards.

Flags override the file (e.g. --workers 8 --seq-len 512); relative paths in the YAML are
relative to the YAML file's directory.  See configs/data/demo.yaml and docs/data-format.md.
"""
from __future__ import annotations

import os

from data_prep.commands._common import add_config_flags, build_config, given_flags, reports_errors, with_node_slice

HELP = "vocab + shards from a YAML config (flags override it)"


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML file (configs/data/*.yaml)")
    parser.add_argument("--out", help="output directory (overrides the config's out)")
    add_config_flags(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of another tokenizer, settings or corpus in <out>/shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@reports_errors
def run(args) -> int:
    from data_prep.config import load_yaml
    from data_prep.pipeline import run_all

    flat = load_yaml(args.config)
    overrides = given_flags(args)
    if "input.paths" in overrides:
        overrides["input.paths"] = [os.path.abspath(p) for p in overrides["input.paths"]]
    flat.update(overrides)
    if args.out:
        flat["out"] = os.path.abspath(args.out)
    if args.no_progress:
        flat["progress"] = False
    cfg = build_config(with_node_slice(flat), args.config)
    run_all(cfg, overwrite=args.overwrite)
    return 0
