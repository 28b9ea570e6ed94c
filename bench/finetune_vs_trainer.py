"""`pretrain finetune` beside transformers' Trainer: the same start, task and hyperparameters.  Not a test;
run it for the table:

    .venv/bin/python bench/finetune_vs_trainer.py [--work bench_out/finetune_vs_trainer] [--seeds 1 2 3]

The start: the HF export of ``pretrain demo``'s model (a tiny BERT, 2 layers of width 64, pretrained
200 steps on the bundled corpus; the demo is run into ``--work`` first unless ``--hf`` names a
BertForPreTraining directory).  Both sides load that same directory.

The task: which of four corpora of ../shared/corpora a passage of ``--words`` words comes from (Austen's
novels, the World English Bible, State of the Union addresses, the Python docs), balanced, ``--n-train``
train and ``--n-dev`` dev passages, written as JSONL.  A real if easy task: style and vocabulary, not
understanding.

The recipe, the same on both sides: AdamW (lr ``--lr``, weight decay 0.01 off biases and LayerNorm
weights), linear decay after ``--warmup-steps`` warmup steps, gradient clipping at 1.0, batch ``--batch``
(one process, no accumulation), ``--epochs`` epochs, fp32 on the CPU, the head's dropout the encoder's
(0.1), inputs truncated to ``--max-length`` tokens and padded per batch, dev accuracy at each epoch end
and the best epoch's reported.  Ours runs as one command over the seeds
(``python -m pretrain finetune ... training.seeds=[...]``), Trainer in this process, seed by seed, one
after the other (never side by side).

Time per epoch: ours from each seed's metrics.jsonl (the span between its first and last training
log lines, scaled to one epoch: start-up excluded, dev evaluations included); Trainer's
``train_runtime`` over the epochs (dev evaluations included, its first step too).
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from pretrain.finetune.demo_task import windows, write_splits
from pretrain.finetune.prepare import steps_per_epoch as epoch_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = os.path.join(os.path.dirname(REPO), "shared", "corpora")
SOURCES = {"austen": "en_austen.txt.gz", "bible": "en_bible_web.txt.gz", "sotu": "en_sotu.txt.gz",
           "pydoc": "en_pydoc.txt.gz"}


def passages(path: str, words: int, count: int, max_bytes: int = 3_000_000) -> list[str]:
    """``count`` passages of ``words`` words from the first ``max_bytes`` of a corpus, spread over it."""
    opener = lzma.open if path.endswith(".xz") else gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read(max_bytes)
    cuts = windows(text.split(), words)
    if len(cuts) < count:
        raise SystemExit(f"{path}: {len(cuts)} passages of {words} words, {count} needed")
    step = len(cuts) // count
    return [" ".join(cuts[i * step]) for i in range(count)]


def write_task(out: str, words: int, n_train: int, n_dev: int) -> tuple[str, str]:
    per = math.ceil((n_train + n_dev) / len(SOURCES))
    rows = [{"text": p, "label": name} for name, file in SOURCES.items()
            for p in passages(os.path.join(CORPORA, file), words, per)]
    random.Random(0).shuffle(rows)
    train, dev = write_splits(out, {"train": rows[:n_train], "dev": rows[n_train:n_train + n_dev]})
    return train, dev


def ours(args, hf: str, train: str, dev: str, steps_per_epoch: int) -> dict:
    out = os.path.join(args.work, "ours")
    cmd = [sys.executable, "-m", "pretrain", "finetune", "--checkpoint", hf, "--train", train, "--dev", dev,
           "--out", out, "task.type=classification", "task.text_pair_column=null",
           f"task.max_length={args.max_length}", f"training.micro_batch_size={args.batch}",
           f"training.global_batch_size={args.batch}", f"training.epochs={args.epochs}",
           f"training.seeds=[{','.join(map(str, args.seeds))}]", "training.precision=fp32",
           "optimizer.name=adamw", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.01",
           "optimizer.max_grad_norm=1.0", f"schedule.warmup_steps={args.warmup_steps}", "schedule.decay=linear",
           "eval.metric=accuracy", "checkpoint.best=false", "logging.progress_bar=false",
           "logging.tensorboard=false", f"logging.every_steps={args.log_every}"]
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    summary = json.load(open(os.path.join(out, "metrics.json")))
    result = {}
    for seed in args.seeds:
        with open(os.path.join(out, f"seed-{seed}", "metrics.jsonl")) as f:
            trains = [r for r in map(json.loads, f) if r["kind"] == "train"]
        per_step = (trains[-1]["time"] - trains[0]["time"]) / (trains[-1]["step"] - trains[0]["step"])
        result[seed] = {"accuracy": summary["seeds"][str(seed)]["accuracy"], "epoch_s": per_step * steps_per_epoch}
    return result


def trainer(args, hf: str, train: str, dev: str) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    def read(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    train_rows, dev_rows = read(train), read(dev)
    labels = sorted({r["label"] for r in train_rows + dev_rows})       # ours: the labels sorted, too
    tok = AutoTokenizer.from_pretrained(hf)

    def encode(rows):
        return [{**tok(r["text"], truncation=True, max_length=args.max_length), "labels": labels.index(r["label"])}
                for r in rows]
    train_set, dev_set = encode(train_rows), encode(dev_rows)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}
    result = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(
            hf, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
        targs = TrainingArguments(
            output_dir=os.path.join(args.work, "trainer", f"seed-{seed}"), per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=2 * args.batch, learning_rate=args.lr, weight_decay=0.01,
            num_train_epochs=args.epochs, warmup_steps=args.warmup_steps, lr_scheduler_type="linear",
            max_grad_norm=1.0, eval_strategy="epoch", save_strategy="no", logging_strategy="no", seed=seed,
            data_seed=seed, report_to=[], use_cpu=True, dataloader_num_workers=0)
        run = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=dev_set,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
        out = run.train()
        evals = [h["eval_accuracy"] for h in run.state.log_history if "eval_accuracy" in h]
        result[seed] = {"accuracy": max(evals), "epoch_s": out.metrics["train_runtime"] / args.epochs}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_out/finetune_vs_trainer")
    p.add_argument("--hf", default=None, help="a BertForPreTraining directory; default: run `pretrain demo`")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--words", type=int, default=24)
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--n-dev", type=int, default=512)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=19)
    p.add_argument("--log-every", type=int, default=8)
    args = p.parse_args()
    args.work = os.path.abspath(args.work)
    hf = args.hf
    if hf is None:
        demo = os.path.join(args.work, "demo")
        hf = os.path.join(demo, "hf")
        if not os.path.isfile(os.path.join(hf, "config.json")):
            subprocess.run([sys.executable, "-m", "pretrain", "demo", "--out", demo, "logging.progress_bar=false"],
                           check=True, cwd=REPO)
    train, dev = write_task(os.path.join(args.work, "task"), args.words, args.n_train, args.n_dev)
    steps_per_epoch = epoch_steps(args.n_train, args.batch)
    began = time.time()
    results = {"pretrain finetune": ours(args, hf, train, dev, steps_per_epoch),
               "transformers Trainer": trainer(args, hf, train, dev)}
    print(f"\n{len(SOURCES)}-way source of a {args.words}-word passage, {args.n_train} train / {args.n_dev} dev, "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, from {hf}  ({time.time() - began:.0f} s)")
    print("| | dev accuracy per seed | mean ± std | s per epoch (median) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        acc = [r[s]["accuracy"] for s in args.seeds]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {name} | {', '.join(f'{a:.4f}' for a in acc)} | {statistics.fmean(acc):.4f} ± {std:.4f} | "
              f"{statistics.median(r[s]['epoch_s'] for s in args.seeds):.2f} |")


if __name__ == "__main__":
    main()
