"""Rewrite a shard directory of format version 1 (one tar member per field of a sample) as format 2
(chunks of zstd-compressed columns): the same samples in the same order, every v1 shard checked
against its manifest first.  --out must be a new (or empty) directory; it appears when complete."""
from __future__ import annotations

from data_prep.commands._common import reports_errors

HELP = "convert a format-1 shard directory to format 2 (same samples, same order)"


def add_arguments(parser):
    parser.add_argument("dir", help="format-1 shard directory")
    parser.add_argument("--out", required=True, help="new shard directory to write")


@reports_errors
def run(args) -> int:
    from data_prep.shards.convert import convert_dir

    manifest = convert_dir(args.dir, args.out)
    t = manifest["splits"]
    print(f"{args.out}: {t['train']['shards']} train shards ({t['train']['samples']:,} samples, "
          f"{t['train']['bytes']:,} bytes), {t['val']['shards']} val shards ({t['val']['samples']:,} samples)")
    return 0
