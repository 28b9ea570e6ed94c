"""What pretraining is worth downstream: fine-tuning from the project's checkpoints at several pretraining
steps beside the same architecture from random initialisation, at the same fine-tuning budget.  Not a
test; run it for the table:

    .venv/bin/python bench/finetune_benefit.py [--work bench_out/finetune_benefit] [--steps 500 1000 2000 4000]

Pretraining: a tiny BERT (configs/debug.yaml: 2 layers of width 64, NSP, LAMB) trained ``max(--steps)``
steps on text of the four corpora of the tasks below (../shared/corpora: Austen's novels, the World
English Bible, State of the Union addresses, the Python docs), each read from its byte ``--pretrain-from``
on (3 MB: after the text the task passages come from, so no passage of a task is pretraining text),
``--pretrain-mb`` MB of each, through ``python -m data_prep run`` and ``python -m pretrain train``; a
checkpoint is kept at every step of ``--steps``.  Its held-out MLM accuracy is shown beside each row.

Fine-tuning, each start the same ``python -m pretrain finetune`` recipe and budget (AdamW lr ``--lr``,
warmup then linear decay, ``--epochs`` epochs, batch 32, fp32, the best epoch's dev score), seeds
``--seeds``; ``random init`` is ``model.init=random`` on the last checkpoint (its architecture and
tokenizer, fresh weights).  Two tasks built from the corpora's first 3 MB:

- ``source``: which of the four corpora a 24-word passage comes from (bench/finetune_vs_trainer.py's task):
  style and vocabulary;
- ``next``: are two 16-word passages consecutive in their corpus, or is the second a random passage of
  the same corpus (balanced): coherence, which NSP pretraining practises.

Both are plumbing-sized tasks that measure a tiny model, not language understanding.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import random
import statistics
import subprocess
import sys

from pretrain.finetune.demo_task import windows, write_splits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_vs_trainer import CORPORA, REPO, SOURCES, write_task  # noqa: E402  (the sibling bench's task)

MB = 1_000_000


def read_text(path: str, start: int, size: int) -> str:
    opener = lzma.open if path.endswith(".xz") else gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        f.read(start)
        return f.read(size)


def write_pretraining_corpus(path: str, start: int, size: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for file in SOURCES.values():
            text = read_text(os.path.join(CORPORA, file), start, size)
            out.writelines(line + "\n" for line in text.splitlines()[1:] if line.strip())   # the first: cut


def write_next_task(out: str, words: int, n_train: int, n_dev: int) -> tuple[str, str]:
    """Pairs of consecutive passages (label 1) and of a passage and a random one of the same corpus (0)."""
    rng = random.Random(0)
    per = (n_train + n_dev) // len(SOURCES)
    rows = []
    for file in SOURCES.values():
        cuts = windows(read_text(os.path.join(CORPORA, file), 0, 3 * MB).split(), words)
        starts = rng.sample(range(len(cuts) - 1), per)
        for k, i in enumerate(starts):
            other = i + 1
            while k % 2 and abs(other - i) <= 1:
                other = rng.randrange(len(cuts))
            rows.append({"text": " ".join(cuts[i]), "text_pair": " ".join(cuts[other]), "label": int(other == i + 1)})
    rng.shuffle(rows)
    return write_splits(out, {"train": rows[:n_train], "dev": rows[n_train:n_train + n_dev]})


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def pretrain(args) -> tuple[str, dict]:
    """Checkpoint root of the pretraining run (kept at every --steps step) and {step: held-out MLM accuracy}."""
    corpus, data, run_dir = (os.path.join(args.work, name) for name in ("pretrain_corpus.txt", "data", "run"))
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isfile(os.path.join(root, f"step-{max(args.steps):06d}", "model.pt")):
        os.makedirs(args.work, exist_ok=True)
        write_pretraining_corpus(corpus, args.pretrain_from * MB, args.pretrain_mb * MB)
        run([sys.executable, "-m", "data_prep", "run", "--config", "configs/data/demo.yaml", "--out", data,
             "--input", corpus, "--no-progress", "--overwrite"])
        gap = min(b - a for a, b in zip([0, *sorted(args.steps)], sorted(args.steps)))
        run([sys.executable, "-m", "pretrain", "train", "--config", "configs/debug.yaml", f"data.dir={data}/shards",
             f"data.tokenizer={data}/tokenizer", f"logging.run_dir={run_dir}", f"training.max_steps={max(args.steps)}",
             f"checkpoint.every_steps={gap}", "checkpoint.keep_last=1000", f"eval.every_steps={gap}",
             "logging.progress_bar=false", "logging.tensorboard=false", "logging.every_steps=100"])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = {r["step"]: r["eval/mlm_accuracy"] for r in map(json.loads, f)
                 if r["kind"] == "eval" and "eval/mlm_accuracy" in r}
    return root, evals


def finetune(args, checkpoint: str, task: tuple[str, str], out: str, random_init: bool) -> list[float]:
    train, dev = task
    run([sys.executable, "-m", "pretrain", "finetune", "--checkpoint", checkpoint, "--train", train, "--dev", dev,
         "--out", out, "task.type=classification", "task.max_length=64", "training.micro_batch_size=32",
         "training.global_batch_size=32", f"training.epochs={args.epochs}",
         f"training.seeds=[{','.join(map(str, args.seeds))}]", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.01",
         "schedule.warmup_ratio=0.1", "eval.metric=accuracy", "checkpoint.best=false", "logging.progress_bar=false",
         "logging.tensorboard=false", f"model.init={'random' if random_init else 'pretrained'}"])
    with open(os.path.join(out, "metrics.json")) as f:
        summary = json.load(f)
    return [summary["seeds"][str(s)]["accuracy"] for s in args.seeds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_out/finetune_benefit")
    p.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pretrain-from", type=int, default=3, help="MB of each corpus skipped (the tasks' text)")
    p.add_argument("--pretrain-mb", type=int, default=2, help="MB of each corpus pretrained on")
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--n-dev", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    args.work = os.path.abspath(args.work)
    root, mlm = pretrain(args)
    tasks = {"source": write_task(os.path.join(args.work, "task_source"), 24, args.n_train, args.n_dev),
             "next": write_next_task(os.path.join(args.work, "task_next"), 16, args.n_train, args.n_dev)}
    last = os.path.join(root, f"step-{max(args.steps):06d}")
    starts = [("random init", last, True, None)] + [
        (f"pretrained {s} steps", os.path.join(root, f"step-{s:06d}"), False, mlm.get(s)) for s in sorted(args.steps)]
    rows = []
    for name, ckpt, random_init, accuracy in starts:
        scores = {t: finetune(args, ckpt, files, os.path.join(args.work, "ft", name.replace(" ", "_"), t), random_init)
                  for t, files in tasks.items()}
        rows.append((name, accuracy, scores))

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {std:.3f}"
    print(f"\nfine-tuning {args.epochs} epochs, lr {args.lr}, batch 32, {args.n_train} train / {args.n_dev} dev, "
          f"seeds {args.seeds}: dev accuracy, mean ± std over the seeds")
    print("| start | held-out MLM accuracy | source (4-way, chance 0.25) | next (binary, chance 0.5) |")
    print("|---|---|---|---|")
    for name, accuracy, scores in rows:
        print(f"| {name} | {'-' if accuracy is None else f'{accuracy:.3f}'} | {cell(scores['source'])} | "
              f"{cell(scores['next'])} |")


if __name__ == "__main__":
    main()
