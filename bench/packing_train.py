"""Packed vs unpacked training (``data.packing``) in the real training loop.  Not a test; run it for the tables:

    .venv/bin/python bench/packing_train.py speed   [--seq-lens 128 512] [--steps 40] [--rounds 3]
    .venv/bin/python bench/packing_train.py quality [--seq-lens 128] [--steps 300] [--seeds 1 2]

Shards are built first under ``--work`` (kept and reused): NSP, dynamic masking, an 8,192-token
WordPiece vocabulary, 2% held out, from two corpora of different shapes:

* ``short``: the bundled demo corpus (data_prep/assets/demo_corpus_en.txt.gz), one short paragraph a
  document, so most instances end at a document's end well short of seq_len;
* ``long``: the first 4 MB of ../shared/corpora/en_sotu.txt.gz, one whole address a document, so
  most instances are filled to seq_len (the long-document case the NSP recipe assumes).

Each run is ``python -m pretrain train --config configs/debug.yaml`` in a subprocess (one rank, the
DeepSpeed engine on CPU, its loader worker, fp32), with the model of ``--model`` (``mini``: 4 layers of
width 256, BERT-mini's shape; ``tiny``: 2 layers of width 128, where the per-instance work that
packing does not shrink -- the MLM head, the optimizer step, the loader -- is a larger share) and the
overrides below; ``data.packing`` is the only difference between the two modes.

``speed``: ``--rounds`` rounds, each running unpacked and packed once in alternating order (so drift
of the machine's speed falls on both); a run's figures are taken from its metrics.jsonl windows
after the first (the first holds start-up): the median window's instances/s (``perf/seq_per_s``)
and real tokens/s (``perf/tokens_per_s``), and the mean fill of the rows (``perf/fill``); the table
gives the median over rounds, their range, and packed/unpacked.

``quality``: for each seed, unpacked and packed runs of ``--steps`` steps (the same instances seen:
the sample order does not depend on packing), then the held-out MLM accuracy and loss over the whole
validation split, evaluated unpacked (the trainer's final evaluation).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pretrain.bench.batches import default_max_predictions  # noqa: E402  (BERT's 20 at 128, 80 at 512)

DEMO = REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz"
SOTU = REPO / ".." / "shared" / "corpora" / "en_sotu.txt.gz"
LONG_BYTES = 4_000_000
MODELS = {  # overrides of configs/debug.yaml's model
    "tiny": ["model.num_layers=2", "model.hidden_size=128", "model.num_heads=2", "model.intermediate_size=512"],
    "mini": ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.intermediate_size=1024"],
}
MODEL_NAMES = {"tiny": "2 layers, hidden 128", "mini": "4 layers, hidden 256 (BERT-mini's shape)"}


def long_corpus(work: Path) -> Path:
    """The first LONG_BYTES of en_sotu (whole lines), gzipped under ``work``."""
    out = work / "sotu_4mb.txt.gz"
    if not out.exists():
        with gzip.open(SOTU, "rb") as f:
            head = f.read(LONG_BYTES)
        tmp = out.with_suffix(".tmp")
        with gzip.open(tmp, "wb") as f:
            f.write(head[:head.rfind(b"\n") + 1])
        os.replace(tmp, out)
    return out


def shards(work: Path, corpus: str, seq_len: int) -> Path:
    """The data_prep output directory (``shards/`` and ``tokenizer/``) of one corpus and seq_len."""
    out = work / f"{corpus}{seq_len}"
    if (out / "shards" / "manifest.json").exists():
        return out
    path = DEMO if corpus == "short" else long_corpus(work)
    config = work / f"{corpus}{seq_len}.yaml"
    config.write_text(json.dumps({
        "out": str(out), "seed": 7, "workers": 1, "input": {"paths": [str(path)], "format": "text"},
        "vocab": {"vocab_size": 8192, "min_frequency": 2, "lowercase": True},
        "shards": {"seq_len": seq_len, "objective": "nsp", "masking": "dynamic",
                   "max_predictions": default_max_predictions(seq_len), "val_fraction": 0.02}}))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def train(args, data: Path, seq_len: int, packing: bool, seed: int, run_dir: Path, full_eval: bool) -> list[dict]:
    """One training run; its metrics.jsonl records (``full_eval``: with the held-out evaluation of the
    whole validation split at step 0 and at the end, none otherwise)."""
    steps, micro, max_per_row, every = args.steps, args.micro, args.max_per_row, args.every
    overrides = MODELS[args.model] + ["model.max_position_embeddings=512",
        f"data.dir={data / 'shards'}", f"data.tokenizer={data / 'tokenizer'}", f"data.packing={str(packing).lower()}",
        f"data.max_instances_per_row={max_per_row}", f"training.seq_len={seq_len}",
        f"training.max_predictions={default_max_predictions(seq_len)}", f"training.micro_batch_size={micro}",
        f"training.global_batch_size={micro}", f"training.max_steps={steps}", f"training.seed={seed}",
        f"logging.run_dir={run_dir}", f"logging.every_steps={every}", "logging.progress_bar=false",
        "logging.tensorboard=false", f"eval.every_steps={steps if full_eval else 0}", "eval.max_batches=0",
        f"checkpoint.every_steps={steps}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "configs/debug.yaml", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"packing_train: a run failed ({'packed' if packing else 'unpacked'}, {data}):\n{proc.stdout[-3000:]}"
                 f"{proc.stderr[-3000:]}")
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rates(records: list[dict]) -> dict:
    """Instances/s, real tokens/s (medians over the training windows after the first: a burst of
    other load on the machine moves a window or two, not the median) and the mean fill."""
    windows = [r for r in records if r["kind"] == "train" and "perf/seq_per_s" in r][1:]
    if len(windows) < 3:
        sys.exit("packing_train: fewer than four logging windows; raise --steps")
    return {"inst_s": statistics.median(w["perf/seq_per_s"] for w in windows),
            "tok_s": statistics.median(w["perf/tokens_per_s"] for w in windows),
            "fill": statistics.fmean(w["perf/fill"] for w in windows)}


def speed(args, work: Path) -> None:
    rows = []
    for corpus in ("short", "long"):
        for seq_len in args.seq_lens:
            data = shards(work, corpus, seq_len)
            got = {False: [], True: []}
            for r in range(args.rounds):
                for packing in ((False, True) if r % 2 == 0 else (True, False)):
                    with tempfile.TemporaryDirectory(dir=work) as run_dir:
                        got[packing].append(rates(train(args, data, seq_len, packing, 1234, Path(run_dir), False)))
                    print(f"  {corpus} {seq_len} {'packed' if packing else 'unpacked'} round {r + 1}: "
                          f"{got[packing][-1]['inst_s']:.1f} instances/s", file=sys.stderr, flush=True)
            med = {p: {k: statistics.median(x[k] for x in got[p]) for k in ("inst_s", "tok_s", "fill")} for p in got}
            spread = {p: (min(x["inst_s"] for x in got[p]), max(x["inst_s"] for x in got[p])) for p in got}
            rows.append((corpus, seq_len, med, spread))
    print(f"\nmodel: {MODEL_NAMES[args.model]}, fp32, 1 rank on CPU ({os.cpu_count()} cores); micro = global batch "
          f"{args.micro}; {args.steps} steps a run, logged every {args.every}, the median window after the first; "
          f"median of {args.rounds} rounds; max_instances_per_row {args.max_per_row}\n")
    print("| shards | seq | fill unpacked | fill packed | instances/s unpacked (range) | instances/s packed (range) "
          "| packed/unpacked | real tokens/s unpacked | real tokens/s packed | packed/unpacked |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for corpus, seq_len, med, spread in rows:
        u, p = med[False], med[True]
        print(f"| {corpus} | {seq_len} | {100 * u['fill']:.1f}% | {100 * p['fill']:.1f}% | {u['inst_s']:.1f} "
              f"({spread[False][0]:.1f}-{spread[False][1]:.1f}) | {p['inst_s']:.1f} ({spread[True][0]:.1f}-"
              f"{spread[True][1]:.1f}) | **{p['inst_s'] / u['inst_s']:.2f}x** | {u['tok_s']:,.0f} | {p['tok_s']:,.0f} "
              f"| {p['tok_s'] / u['tok_s']:.2f}x |")


def quality(args, work: Path) -> None:
    rows = []
    for seq_len in args.seq_lens:
        data = shards(work, "short", seq_len)
        for seed in args.seeds:
            for packing in (False, True):
                with tempfile.TemporaryDirectory(dir=work) as run_dir:
                    records = train(args, data, seq_len, packing, seed, Path(run_dir), True)
                final = [r for r in records if r["kind"] == "eval"][-1]
                last = [r for r in records if r["kind"] == "train"][-1]
                rows.append((seq_len, seed, packing, final["eval/mlm_accuracy"], final["eval/mlm_loss"],
                             last["train/loss"]))
                print(f"  {seq_len} seed {seed} {'packed' if packing else 'unpacked'}: held-out MLM accuracy "
                      f"{final['eval/mlm_accuracy']:.4f}", file=sys.stderr, flush=True)
    print(f"\nshort-document shards; model: {MODEL_NAMES[args.model]}, dropout 0.1, fp32, 1 rank on CPU; micro = global "
          f"batch {args.micro}, {args.steps} steps ({args.steps * args.micro:,} instances, the same ones in both "
          f"modes); held-out: the whole validation split, unpacked\n")
    print("| seq | seed | mode | held-out MLM accuracy | held-out MLM loss | last train loss |")
    print("|---|---|---|---|---|---|")
    for seq_len, seed, packing, acc, loss, train_loss in rows:
        print(f"| {seq_len} | {seed} | {'packed' if packing else 'unpacked'} | {acc:.4f} | {loss:.4f} | {train_loss:.4f} |")
    for seq_len in args.seq_lens:
        acc = {p: [r[3] for r in rows if r[0] == seq_len and r[2] == p] for p in (False, True)}
        pairs = [b - a for a, b in zip(acc[False], acc[True])]
        seeds = [max(v) - min(v) for v in acc.values()]
        print(f"\nseq {seq_len}: mean held-out MLM accuracy unpacked {statistics.fmean(acc[False]):.4f}, packed "
              f"{statistics.fmean(acc[True]):.4f}; packed - unpacked at the same seed: "
              f"{', '.join(f'{d:+.4f}' for d in pairs)}; spread between seeds: unpacked {seeds[0]:.4f}, "
              f"packed {seeds[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["speed", "quality"])
    parser.add_argument("--seq-lens", type=int, nargs="+", choices=[128, 512], default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a run (speed 60, quality 300)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: rounds of (unpacked, packed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="quality: training seeds")
    parser.add_argument("--model", choices=sorted(MODELS), default="mini", help="model shape (configs/debug.yaml's otherwise)")
    parser.add_argument("--micro", type=int, default=32, help="instances a step (micro = global batch)")
    parser.add_argument("--max-per-row", type=int, default=8, help="data.max_instances_per_row (its default: 8)")
    parser.add_argument("--every", type=int, default=5, help="logging.every_steps (a window of the speed figures)")
    parser.add_argument("--work", default=None, help="where shards and runs go (default: a new temporary directory)")
    args = parser.parse_args()
    args.seq_lens = args.seq_lens or ([128, 512] if args.mode == "speed" else [128])
    args.steps = args.steps or (60 if args.mode == "speed" else 300)
    if args.mode == "speed" and not SOTU.exists():
        sys.exit(f"packing_train: {SOTU} is missing (../shared/corpora): the long-document shards come from it")
    work = Path(args.work or tempfile.mkdtemp(prefix="packing_train_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"packing_train: shards and runs under {work}", file=sys.stderr)
    (speed if args.mode == "speed" else quality)(args, work)


if __name__ == "__main__":
    main()
