"""Print samples decoded to word pieces with the masks shown: [MASK:orig] for a token replaced by
[MASK], {random>orig} for a random replacement, <orig> for a chosen token kept as is.  Dynamic
shards are masked as the loader would in --epoch."""
from __future__ import annotations

from data_prep.commands._common import reports_errors

HELP = "decode samples to text with the masks shown"


def add_arguments(parser):
    parser.add_argument("dir", help="shard directory")
    parser.add_argument("-n", type=int, default=5, help="number of samples (default 5)")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--epoch", type=int, default=0, help="dynamic masking: the epoch to show")


@reports_errors
def run(args) -> int:
    from data_prep.report import render_samples

    print(render_samples(args.dir, args.n, args.split, args.epoch))
    return 0
