"""Read, clean, split, tokenize, build instances, mask and write WebDataset shards + manifest.json.

Reruns skip finished shards; another tokenizer, other shard settings or another corpus in DIR are
refused (use --overwrite or a new --out), and so is any file in DIR that data_prep did not write
at a name it writes.  One run at a time per DIR.  Example:

  python -m data_prep shards --input corpus/*.txt.gz --tokenizer vocab/ --out shards/ \\
      --seq-len 128 --objective nsp --masking dynamic --dupe-factor 5 --workers 8
"""
from __future__ import annotations

from data_prep.commands._common import add_config_flags, build_config, given_flags, reports_errors, with_node_slice

HELP = "corpora -> WebDataset shards (train-NNNNNN.tar, val-NNNNNN.tar) + manifest.json"


def add_arguments(parser):
    parser.add_argument("--tokenizer", required=True, help="tokenizer dir from `vocab`, or a tokenizer.json / vocab.txt")
    parser.add_argument("--out", required=True, help="output directory of the shards")
    add_config_flags(parser)
    case = parser.add_mutually_exclusive_group()
    case.add_argument("--uncased", dest="lowercase", action="store_const", const=True, default=None,
                      help="a bare vocab.txt is uncased (the default unless tokenizer_config.json says otherwise)")
    case.add_argument("--cased", dest="lowercase", action="store_const", const=False, help="a bare vocab.txt is cased")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another tokenizer, settings or corpus in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@reports_errors
def run(args) -> int:
    from data_prep.pipeline import build_shards

    flat = with_node_slice(given_flags(args))
    flat["out"] = args.out
    if args.no_progress:
        flat["progress"] = False
    cfg = build_config(flat)
    build_shards(cfg, args.tokenizer, cfg.out, overwrite=args.overwrite, lowercase=args.lowercase)
    return 0
