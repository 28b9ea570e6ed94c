"""Shard size and speed of format 2: bytes per instance (static and dynamic masking, seq 128 and 512)
beside NVIDIA's gzip HDF5 (279 B per instance at seq 128, measured on 10.8 MB of English with a 30,000
vocabulary when the format's targets were set; not re-run here), the CPU
time to write the shards and to read them back, and the chunk size x zstd level grid the format's
defaults were chosen from.  Not a test; run it when you want the table:

    .venv/bin/python bench/shard_size.py [--corpus TEXT --tokenizer DIR] [--work DIR]

Defaults: 10.8 MB of ../shared/corpora/en_sotu.txt.gz (real text) and a 30,522-piece WordPiece
vocabulary trained on it; NSP, dupe factor 1, max_predictions 20 (seq 128) / 80 (seq 512), as
NVIDIA's create_pretraining_data.py runs; 4 MB of text per shard (what a corpus of 64 MB or more
gets by default; a smaller one is cut finer, into smaller shards that compress a little worse).  Every shards / verify / stats run is a fresh
``python -m data_prep`` process whose CPU time (user + system, its workers included) is reported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from data_prep_throughput import children_cpu, head_text, train_vocab  # noqa: E402

from data_prep.shards import ShardWriter, column_dtype, read_manifest, split_info  # noqa: E402
from data_prep.shards.reader import iter_split_shards  # noqa: E402

NVIDIA_B_PER_INSTANCE = 279
GRID_CHUNKS = (1024, 4096, 16384)
GRID_LEVELS = (3, 6, 9)


def data_prep(*args) -> float:
    """CPU seconds of one ``python -m data_prep`` run."""
    cpu = children_cpu()
    subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], check=True, capture_output=True, cwd=REPO)
    return children_cpu() - cpu


def build(corpus: Path, tokenizer: Path, out: Path, seq_len: int, masking: str, unit_mb: float) -> dict:
    cpu = data_prep("shards", "--input", corpus, "--tokenizer", tokenizer, "--out", out, "--seq-len", seq_len,
                    "--text-per-shard-mb", unit_mb,
                    "--objective", "nsp", "--masking", masking, "--dupe-factor", 1, "--max-predictions",
                    20 if seq_len == 128 else 80, "--workers", 1, "--no-progress", "--overwrite")
    manifest = read_manifest(out)
    samples = sum(s["samples"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    start = time.process_time()
    decoded = sum(len(shard) for split in ("train", "val") for _, shard in iter_split_shards(out, manifest, split))
    read_cpu = time.process_time() - start
    assert decoded == samples
    return {"seq_len": seq_len, "masking": masking, "samples": samples, "bytes": size,
            "b_per_instance": size / samples, "tokens_per_instance": sum(s["tokens"] for s in manifest["shards"]) / samples,
            "build_cpu": cpu, "read_cpu": read_cpu, "read_mb_s": size / 1e6 / read_cpu,
            "read_samples_s": samples / read_cpu, "verify_cpu": data_prep("verify", out),
            "stats_cpu": data_prep("stats", out)}


def grid(out: Path) -> list[dict]:
    """The train split of ``out`` rewritten with every chunk size x level of the grid: bytes per
    instance (tar headers and padding included) and the CPU time of the writes."""
    manifest = read_manifest(out)
    info = split_info(manifest, "train")
    shards = [shard for _, shard in iter_split_shards(out, manifest, "train")]
    samples = sum(len(s) for s in shards)
    columns = {c: column_dtype(c, info["token_dtype"]) for c in manifest["sample_format"]["columns"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in GRID_CHUNKS:
            for level in GRID_LEVELS:
                size, start = 0, time.process_time()
                for shard in shards:
                    writer = ShardWriter(Path(tmp) / "train-000000.tar", shard.split, shard.index, columns, chunk,
                                         level)
                    writer.add(dict(shard.columns), len(shard))
                    size += writer.commit()["bytes"]
                rows.append({"chunk": chunk, "level": level, "b_per_instance": size / samples,
                             "write_cpu": time.process_time() - start})
    return rows


def vs_nvidia(run: dict) -> str:
    """Ours over NVIDIA's figure, which is for seq 128 only."""
    return f"{run['b_per_instance'] / NVIDIA_B_PER_INSTANCE:.2f}x" if run["seq_len"] == 128 else "-"


def report(runs: list[dict], grids: dict, corpus: Path, unit_mb: float) -> str:
    mb = corpus.stat().st_size / 1e6
    lines = [f"Corpus {corpus.name} ({mb:.1f} MB), NSP, dupe factor 1, {unit_mb:g} MB of text per shard; "
             "NVIDIA's gzip HDF5 at seq 128, static (quoted, not re-run): "
             f"{NVIDIA_B_PER_INSTANCE} B/instance.", "",
             "| seq | masking | instances | tokens/inst | B/instance | vs NVIDIA | build CPU-s | read CPU-s (MB/s, "
             "samples/s) | verify CPU-s | stats CPU-s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seq_len']} | {r['masking']} | {r['samples']:,} | {r['tokens_per_instance']:.0f} | "
                     f"{r['b_per_instance']:.0f} | {vs_nvidia(r)} | "
                     f"{r['build_cpu']:.1f} | {r['read_cpu']:.2f} ({r['read_mb_s']:.0f}, {r['read_samples_s']:,.0f}) | "
                     f"{r['verify_cpu']:.1f} | {r['stats_cpu']:.1f} |")
    for name, rows in grids.items():
        lines += ["", f"Chunk size x zstd level, {name} (train split rewritten; B/instance, write CPU-s):", "",
                  "| chunk | " + " | ".join(f"level {lv}" for lv in GRID_LEVELS) + " |",
                  "|---|" + "---|" * len(GRID_LEVELS)]
        for chunk in GRID_CHUNKS:
            cells = [f"{r['b_per_instance']:.0f} ({r['write_cpu']:.2f} s)" for r in rows if r["chunk"] == chunk]
            lines.append(f"| {chunk} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bertforge_shard_size_bench", help="scratch directory")
    parser.add_argument("--corpus", help="a text file (default: 10.8 MB of en_sotu)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: trained on the corpus, 30,522 pieces)")
    parser.add_argument("--text-per-shard-mb", type=float, default=4.0, help="work unit size (default 4)")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / "sotu_10.8mb.txt"
    if not corpus.exists():
        corpus.write_text(head_text("en_sotu.txt.gz", int(10.8e6)))
    tokenizer = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if not tokenizer.exists():
        train_vocab(work, corpus)
    runs, grids = [], {}
    for seq_len in (128, 512):
        for masking in ("static", "dynamic"):
            out = work / f"shards_{seq_len}_{masking}"
            runs.append(build(corpus, tokenizer, out, seq_len, masking, args.text_per_shard_mb))
            if seq_len == 128:
                grids[f"seq {seq_len} {masking}"] = grid(out)
    print(report(runs, grids, corpus, args.text_per_shard_mb))
    if args.json:
        print(json.dumps({"runs": runs, "grids": grids}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
