"""How full the rows of training are, padded and packed (``data.packing``).  Not a test; run it for the table:

    .venv/bin/python bench/packing_fill.py DIR [DIR ...] [--micro 32 64 256] [--samples 50000] [--max-per-row 8]

Each DIR is a shard directory written by ``python -m data_prep shards`` (or ``run``).  Its train
split's instances are taken in the training order (``pretrain.data.GlobalOrder``, seed 1234 and the
default shuffle window), cut into micro-batches of ``--micro`` instances as the loader cuts them, and
each micro-batch laid out three ways.  Fill is real tokens / slots:

* ``padded``: one instance a row, the row as wide as the batch's longest rounded up to 8 (the
  unpacked loader, ``pretrain.data.collate``);
* ``packed``: ``pretrain.packing.collate_packed``'s rows (first-fit decreasing, at most
  ``--max-per-row`` instances a row, the fullest row rounded up to 8);
* ``bound``: ceil(the micro-batch's tokens / seq_len) rows of seq_len, the fewest any packing of
  that micro-batch can use (the rows a packing across the whole split would need is the last column).

``rows/batch`` is packed rows per micro-batch; ``speed-up bound`` is padded slots / packed slots, what
packing can at most gain where compute is linear in the slots.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUND = 8


def train_lengths(shard_dir: str, samples: int) -> tuple[np.ndarray, int, str]:
    """The lengths of the first ``samples`` training positions (in training order), seq_len, objective."""
    from data_prep.shards import read_entry, read_manifest, split_info
    from data_prep.shards.store import open_store
    from pretrain.config import DataConfig
    from pretrain.data import GlobalOrder

    manifest = read_manifest(shard_dir)
    info = split_info(manifest, "train")
    store = open_store(shard_dir)
    per_shard = [np.asarray(read_entry(store, entry).columns["lengths"], dtype=np.int64) for entry in info["shards"]]
    lengths = np.concatenate(per_shard)
    order = GlobalOrder([len(x) for x in per_shard], seed=1234, window_samples=DataConfig().shuffle_buffer)
    count = min(samples, len(lengths))
    return lengths[[order(p)[1] for p in range(count)]], int(info["seq_len"]), str(info["objective"])


def fills(lengths: np.ndarray, seq_len: int, micro: int, max_per_row: int) -> dict:
    from pretrain.packing import layout

    real = padded = packed = bound = rows = 0
    batches = len(lengths) // micro
    for b in range(batches):
        batch = lengths[b * micro:(b + 1) * micro]
        tokens = int(batch.sum())
        real += tokens
        padded += micro * (-(-int(batch.max()) // ROUND) * ROUND)     # pretrain.data.collate's width
        packing, width = layout(batch, seq_len, max_per_row, ROUND)
        packed += len(packing) * width
        rows += len(packing)
        bound += math.ceil(tokens / seq_len) * seq_len
    return {"padded": real / padded, "packed": real / packed, "bound": real / bound,
            "rows": rows / batches, "speedup": padded / packed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--micro", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--max-per-row", type=int, default=8)
    args = parser.parse_args(argv)
    print("| shards | objective | seq | mean tokens | micro | padded fill | packed fill | bound fill | "
          "rows/batch | speed-up bound | whole-split bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shard_dir in args.dirs:
        lengths, seq_len, objective = train_lengths(shard_dir, args.samples)
        split_bound = lengths.sum() / (math.ceil(lengths.sum() / seq_len) * seq_len)
        for micro in args.micro:
            f = fills(lengths, seq_len, micro, args.max_per_row)
            print(f"| {shard_dir} | {objective} | {seq_len} | {lengths.mean():.1f} | {micro} | {f['padded']:.1%} | "
                  f"{f['packed']:.1%} | {f['bound']:.1%} | {f['rows']:.1f} | {f['speedup']:.2f}x | {split_bound:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
