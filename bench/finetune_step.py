"""Where a fine-tuning step's time goes: the engine at ZeRO stage 1 and 0 beside a plain torch loop, and our
model's forward + backward beside transformers' BertForSequenceClassification.  Not a test; run it for the
table (one process, one rank, CPU or the first GPU):

    .venv/bin/python bench/finetune_step.py [--hf DIR] [--rounds 6] [--steps 40]

Every path steps the same model (our FinetuneModel from ``--hf``, a BertForPreTraining directory; default:
the export of ``pretrain demo``, run into bench_out/finetune_step first) on one fixed batch of 32 rows of 48
tokens (40 real), sequence head of 4 classes, training mode, fp32: AdamW lr 1e-3, clipping at 1.0, the
warmup-then-linear schedule.  The paths take turns, ``--rounds`` rounds of ``--steps`` timed steps after 5
untimed ones, and the best round of each is shown (ms per step).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf", default=None)
    p.add_argument("--work", default="bench_out/finetune_step")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    hf = args.hf
    if hf is None:
        demo = os.path.join(os.path.abspath(args.work), "demo")
        hf = os.path.join(demo, "hf")
        if not os.path.isfile(os.path.join(hf, "config.json")):
            subprocess.run([sys.executable, "-m", "pretrain", "demo", "--out", demo, "logging.progress_bar=false"],
                           check=True, cwd=REPO)
    from pretrain.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    from pretrain.engine import Engine, init_distributed
    from pretrain.finetune.config import load_finetune_config
    from pretrain.finetune.model import from_pretrained
    from pretrain.finetune.train import build_finetune_optimizer, finetune_stats
    from pretrain.optim import build_scheduler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed("nccl" if device.type == "cuda" else "gloo", 600)
    torch.manual_seed(0)
    ids = torch.randint(5, 2000, (32, 48))
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
             "labels": torch.randint(0, 4, (32,)).to(device)}

    def step_fn(kind: str):
        cfg = load_finetune_config(None, ["optimizer.lr=1e-3", "optimizer.max_grad_norm=1.0",
                                          f"zero.stage={1 if kind == 'engine, ZeRO stage 1' else 0}"],
                                   {"model.checkpoint": hf, "task.train": "-", "task.dev": "-"})
        if kind == "transformers model, plain loop":
            model = transformers.BertForSequenceClassification.from_pretrained(hf, num_labels=4).to(device).train()
        else:
            model = from_pretrained(hf, "sequence", 4)[0].to(device).train()
        optimizer = build_finetune_optimizer(model, cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.schedule, 10**6)
        if kind.startswith("engine"):
            engine = Engine(cfg, model, optimizer, scheduler, 1, stats=finetune_stats)
            return lambda i: engine.step(lambda: batch, i)

        def plain(i):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        return plain

    kinds = ["engine, ZeRO stage 1", "engine, ZeRO stage 0", "our model, plain loop", "transformers model, plain loop"]
    fns = {k: step_fn(k) for k in kinds}
    best, n = {k: float("inf") for k in kinds}, 1
    for _ in range(args.rounds):
        for kind, fn in fns.items():
            for _ in range(5):
                fn(n)
                n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(args.steps):
                fn(n)
                n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[kind] = min(best[kind], (time.perf_counter() - began) / args.steps * 1000)
    print(f"\none fine-tuning step, batch 32 x 48, {hf}, {device}: best of {args.rounds} rounds of {args.steps}")
    print("| path | ms per step |")
    print("|---|---|")
    for kind in kinds:
        print(f"| {kind} | {best[kind]:.1f} |")


if __name__ == "__main__":
    main()
