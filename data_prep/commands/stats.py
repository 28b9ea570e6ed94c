"""Token counts, fill (real tokens / (samples x seq_len)) and tokens per instance, length histogram,
masking rate (as stored, or as the loader masks in --epoch) and NSP/SOP label balance of a shard directory."""
from __future__ import annotations

from data_prep.commands._common import reports_errors

HELP = "token counts, fill, length histogram, masking rate, NSP/SOP balance"


def add_arguments(parser):
    parser.add_argument("dir", help="shard directory")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--max-samples", type=int, default=None, help="look at the first N samples only")
    parser.add_argument("--epoch", type=int, default=0, help="dynamic masking: the epoch to simulate")
    parser.add_argument("--json", action="store_true", help="print JSON")


@reports_errors
def run(args) -> int:
    from data_prep.report import collect_stats, format_stats, stats_json

    s = collect_stats(args.dir, args.split, args.max_samples, args.epoch)
    print(stats_json(s) if args.json else format_stats(s))
    return 0
