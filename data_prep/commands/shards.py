"""Read, clean, split, tokenize, build instances, mask and write WebDataset shards + manifest.json.

Reruns skip finished shards; another tokenizer, other shard settings or another corpus in DIR are
refused (use --overwrite or a new --out), and so is any file in DIR that data_prep did not write
at a name it writes.  One run at a time per DIR.  Example:

  python -m data_prep shards --input corpus/*.txt.gz --tokenizer vocab/ --out shards/ \\
      --seq-len 128 --objective nsp --masking dynamic --dupe-factor 5 --workers 8
"""
from __future__ import annotations

from data_prep.commands._common import add_config_flags, config_from_args, reports_errors

HELP = "corpora -> WebDataset shards (train-NNNNNN.tar, val-NNNNNN.tar) + manifest.json"


def add_arguments(parser):
    parser.add_argument("--tokenizer", required=True, help="tokenizer dir from `vocab`, or a tokenizer.json / vocab.txt")
    add_config_flags(parser, ("", "input", "clean", "shards", "vocab.lowercase"), required=("out",))
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another tokenizer, settings or corpus in --out")


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import build_shards

    cfg = config_from_args(args)
    build_shards(cfg, args.tokenizer, cfg.out, overwrite=args.overwrite)
    return 0
