"""Check a shard directory: the manifest's fields (a missing or bad one is a one-line error naming
its key), its split totals, every shard's size and sha256 and (unless --quick) the samples
themselves (keys in order, fields, values in range, sample and token counts).  Exit status 1 on a
problem."""
from __future__ import annotations

from data_prep.commands._common import reports_errors

HELP = "check manifest.json and every shard against it (size, sha256, samples)"


def add_arguments(parser):
    parser.add_argument("dir", help="shard directory")
    parser.add_argument("--quick", action="store_true", help="sizes and checksums only, do not read samples")


@reports_errors
def run(args) -> int:
    from data_prep.report import verify_dir
    from data_prep.shards import read_manifest

    problems, warnings = verify_dir(args.dir, deep=not args.quick)
    for w in warnings:
        print(f"warning: {w}")
    for p in problems:
        print(f"FAIL: {p}")
    n = len(read_manifest(args.dir)["shards"])
    print(f"{args.dir}: {n} shards, {len(problems)} problem(s), {len(warnings)} warning(s)")
    return 1 if problems else 0
