"""Training loader throughput per worker, its memory and its read pattern.  Not a test; run it for the table:

    .venv/bin/python bench/loader_throughput.py [--data-128 DIR] [--data-512 DIR] [--mb 4] [--samples 20000]

Without --data-*, shard directories are built first (dynamic masking, NSP, a WordPiece vocabulary
trained to at most 30,000 tokens) from ../shared/corpora's English text, or the bundled demo corpus where that is absent.
Each seq_len is read by one process through ``build_train_loader`` with ``num_workers=0``: what one
loader worker does (whole-shard reads through the store, sha256, zstd decoding, dynamic masking,
collation into micro-batches of 32).  Reported per worker:

* samples/s over --samples positions, shard reads and decoding included;
* MB per worker: decoded bytes per sample x the samples of two shuffle windows at the default
  ``data.shuffle_buffer`` (what a worker keeps), and the most the run itself kept;
* bytes per read call and read calls per shard (the store's counters);
* beside them, the samples/s one GPU consumes at ../shared/docs/anchors.md's targets, and so the
  loader workers a GPU needs.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import lzma
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPORA = REPO / ".." / "shared" / "corpora"
ENGLISH = ["en_austen.txt.gz", "en_sotu.txt.gz", "en_bible_web.txt.gz", "en_pydoc.txt.gz"]
DEMO = REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz"
MICRO = 32
PARAGRAPHS = 30   # paragraphs a document (the corpora hold one paragraph a line): instances of full length

# samples/s one GPU takes at the targets of ../shared/docs/anchors.md ("Throughput to beat"): the best
# measured results, and BERT-base at 50% MFU of an H100's 989 TFLOP/s (69.8 / 301 GFLOP a sequence).
GPU_NEEDS = {128: [("MLPerf v3.0 H100, BERT-large", 970.0), ("BERT-base, H100 at 50% MFU", 989e12 * 0.5 / 69.8e9)],
             512: [("DeepSpeed V100, BERT-large", 52.0), ("BERT-base, H100 at 50% MFU", 989e12 * 0.5 / 301e9)]}


def corpus_text(n_bytes: int) -> str:
    """About ``n_bytes`` of English text, equal parts of the shared corpora (else the demo corpus), as
    documents of PARAGRAPHS paragraphs separated by blank lines."""
    names = [CORPORA / n for n in ENGLISH if (CORPORA / n).exists()] or [DEMO]
    out = []
    for path in names:
        size = 0
        out.append("\n")
        with (lzma.open if path.suffix == ".xz" else gzip.open)(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(line + ("\n" if len(out) % PARAGRAPHS == 0 else ""))
                    size += len(line.encode())
                    if size >= n_bytes / len(names):
                        break
    return "".join(out)


def build(work: Path, seq_len: int, mb: float) -> Path:
    """A shard directory (dynamic masking) of ``mb`` MB of text at ``seq_len``; the tokenizer trained once."""
    corpus = work / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(corpus_text(int(mb * 1e6)), encoding="utf-8")
    trained = sorted(work.glob("seq*/tokenizer"))          # one vocabulary for every seq_len
    vocab = f"{{tokenizer: {trained[0]}}}" if trained else "{vocab_size: 30000, min_frequency: 2}"
    out = work / f"seq{seq_len}"
    config = work / f"seq{seq_len}.yaml"
    config.write_text(f"""
out: {out}
seed: 7
workers: 2
progress: false
input: {{paths: [{corpus}], format: text, doc_separator: blank}}
vocab: {vocab}
shards: {{seq_len: {seq_len}, objective: nsp, masking: dynamic, max_predictions: {20 if seq_len == 128 else 80},
          val_fraction: 0.0}}
""")
    proc = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"building the seq {seq_len} shards failed:\n{proc.stderr[-3000:]}")
    return out / "shards"


def measure(shard_dir: Path, seq_len: int, samples: int) -> dict:
    from pretrain.config import DataConfig, TrainingConfig
    from pretrain.data import DataPosition, build_train_loader, open_split

    data = DataConfig(dir=str(shard_dir), num_workers=0, pin_memory=False)
    training = TrainingConfig(micro_batch_size=MICRO, global_batch_size=MICRO, seq_len=seq_len,
                              max_predictions=20 if seq_len == 128 else 80)
    split = open_split(data, "train", training, model_vocab_size=30522)
    loader = build_train_loader(split, data, training, position=DataPosition(0), rank=0, world_size=1, accum=1)
    dataset, store = loader.dataset, split.splits[0].store
    shard_reads = []
    read_checked = store.read_checked

    def counted(name, size, sha256):
        shard_reads.append(size)
        return read_checked(name, size, sha256)
    store.read_checked = counted
    batches, kept_most = math.ceil(samples / MICRO), 0
    store.read_calls = store.bytes_read = 0          # the manifest's reads left out
    began = time.perf_counter()
    for batch in itertools.islice(iter(loader), batches):
        kept_most = max(kept_most, sum(s.nbytes for s in dataset._kept[0].values()))
    seconds = time.perf_counter() - began
    decoded = [dataset._shard(0, i) for i in range(len(split.splits[0].shards))]
    per_sample = sum(d.nbytes for d in decoded) / sum(len(d) for d in decoded)
    window = DataConfig().shuffle_buffer
    return {"seq_len": seq_len, "samples_per_s": batches * MICRO / seconds,
            "bytes_per_sample": per_sample, "mb_per_worker": 2 * window * per_sample / 1e6,
            "kept_mb": kept_most / 1e6, "bytes_per_call": store.bytes_read / max(store.read_calls, 1),
            "calls_per_shard": store.read_calls / max(len(shard_reads), 1),
            "shard_mb": sum(shard_reads) / max(len(shard_reads), 1) / 1e6, "samples": split.num_samples}


def table(rows: list[dict]) -> str:
    out = ["| seq | samples/s per worker | decoded B/sample | MB per worker (default window) | MB kept in this run "
           "| bytes per read call | read calls per shard | mean shard MB | one GPU needs (samples/s) "
           "| workers per GPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        needs = GPU_NEEDS[r["seq_len"]]
        need_words = "; ".join(f"{n:,.0f} ({what})" for what, n in needs)
        workers = " / ".join(str(math.ceil(n / r["samples_per_s"])) for _, n in needs)
        out.append(f"| {r['seq_len']} | {r['samples_per_s']:,.0f} | {r['bytes_per_sample']:,.0f} "
                   f"| {r['mb_per_worker']:,.0f} | {r['kept_mb']:,.1f} | {r['bytes_per_call']:,.0f} "
                   f"| {r['calls_per_shard']:.1f} | {r['shard_mb']:.2f} | {need_words} | {workers} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-128", type=Path, help="a shard directory at seq 128 (dynamic masking)")
    parser.add_argument("--data-512", type=Path, help="a shard directory at seq 512 (dynamic masking)")
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text for the shards built (default 4)")
    parser.add_argument("--samples", type=int, default=20000, help="positions read per seq_len")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], choices=[128, 512])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as work:
        rows = []
        for seq_len in args.seq:
            shard_dir = getattr(args, f"data_{seq_len}") or build(Path(work), seq_len, args.mb)
            rows.append(measure(shard_dir, seq_len, args.samples))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
