"""What distillation is worth: a half-depth student distilled from a teacher the project pretrained, beside the
same student trained from scratch for the same steps on the same data.  Not a test; run it for the table:

    .venv/bin/python bench/distill.py [--work bench_out/distill] [--teacher-steps 2000] [--steps 1000]

Data: ``--mb`` MB of each of four corpora of ../shared/corpora (Austen's novels, the World English Bible, State
of the Union addresses, the Python docs; bench/finetune_benefit.py's reader), through ``python -m data_prep run``
with configs/data/demo.yaml (a WordPiece vocabulary of 8192, seq 128, dynamic masking, 2% held out) but
RoBERTa's full-sentence rows: no sentence objective, which a student from scratch (no sentence head) cannot
train on.  Teacher: BERT-mini-sized (4 layers of width 256, 4 heads, FFN 1024, no sentence head; ``--layers``
etc. change it) trained
``--teacher-steps`` steps by ``python -m pretrain train`` with configs/debug.yaml's recipe (LAMB, lr 5e-3, batch
32, fp32), or ``--teacher DIR``, one of our checkpoints.  Students: ``python -m pretrain distill`` with
DistilBERT's defaults (every other teacher layer, distilbert-shaped, T 2, alphas 5/2/1) for ``--steps`` steps,
then ``python -m pretrain train`` on the distilled run's own config (the same student shape, data, recipe,
steps and seed; the weights random).  Held-out MLM accuracy: each run's last evaluation, over
``--eval-batches`` batches of the same val split.  Forward throughput: sequences per second of the eval-mode
forward (encoder and MLM head at the masked positions, fp32, this machine's CPU threads) on ``--batch`` x 128
token batches (pretrain.bench.batches), median of 10 after 2 warm-up, per second of wall time and of the
process's CPU time (steadier on a shared machine); parameters: the exported weights.

Expected time on a quiet 2-core CPU at the defaults, about 1 h 50 min: the data a few minutes, the teacher
~65 min (2000 steps of ~2 s), the distilled student ~25 min (1000 steps of ~1.4 s: its 2 layers trained and
the teacher's forward), the student from scratch ~15 min (~0.9 s a step).  Estimated from single steps at
batch 32 x 128 measured here under load, in CPU seconds of 2 threads: a teacher training step 3.9, a
student's 1.8, the teacher's forward 0.9.  Rerun after a kill, each run resumes from its last checkpoint
(every 500 steps) and finished ones are reused (delete --work to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_benefit import MB, write_pretraining_corpus  # noqa: E402  (the sibling bench's corpus)
from finetune_vs_trainer import REPO  # noqa: E402

from pretrain.bench.batches import make_batches  # noqa: E402
from pretrain.bench.timing import time_steps  # noqa: E402
from pretrain.weights import load_model  # noqa: E402

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.every_steps=100"]


def run(cmd: list) -> None:
    subprocess.run([sys.executable, *map(str, cmd)], check=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def final_checkpoint(run_dir: str, steps: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{steps:06d}")


def first_and_last_eval(run_dir: str) -> dict:
    """The first and the last held-out evaluation of a run: {step: eval/mlm_accuracy}."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if r["kind"] == "eval" and "eval/mlm_accuracy" in r]
    return {r["step"]: r["eval/mlm_accuracy"] for r in (evals[0], evals[-1])}


def prepare_data(args) -> list[str]:
    data = os.path.join(args.work, "data")
    if not os.path.isfile(os.path.join(data, "shards", "manifest.json")):
        os.makedirs(args.work, exist_ok=True)
        corpus = os.path.join(args.work, "corpus.txt")
        write_pretraining_corpus(corpus, 0, int(args.mb * MB))
        run(["-m", "data_prep", "run", "--config", "configs/data/demo.yaml", "--out", data, "--input", corpus,
             "--objective", "full-sentences", "--no-progress", "--overwrite"])
    return [f"data.dir={data}/shards", f"data.tokenizer={data}/tokenizer", f"eval.max_batches={args.eval_batches}",
            f"training.micro_batch_size={args.batch}", f"training.global_batch_size={args.batch}"]


def train_teacher(args, data: list[str]) -> str:
    run_dir = os.path.join(args.work, "teacher")
    ckpt = final_checkpoint(run_dir, args.teacher_steps)
    if not os.path.isfile(os.path.join(ckpt, "model.pt")):
        run(["-m", "pretrain", "train", "--config", "configs/debug.yaml", *data, *QUIET, f"logging.run_dir={run_dir}",
             f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
             f"model.intermediate_size={args.intermediate}", "model.sentence_head=none",
             f"training.max_steps={args.teacher_steps}",
             f"checkpoint.every_steps={min(500, args.teacher_steps)}", f"eval.every_steps={args.teacher_steps}"])
    return ckpt


def train_students(args, data: list[str], teacher: str) -> tuple[str, str]:
    distilled, scratch = (os.path.join(args.work, name) for name in ("distilled", "scratch"))
    steps = [f"training.max_steps={args.steps}", f"checkpoint.every_steps={min(500, args.steps)}",
             f"eval.every_steps={args.steps}"]
    if not os.path.isfile(os.path.join(final_checkpoint(distilled, args.steps), "model.pt")):
        run(["-m", "pretrain", "distill", "--config", "configs/debug.yaml", *data, *QUIET, *steps,
             f"distill.teacher={teacher}", f"logging.run_dir={distilled}"])
    if not os.path.isfile(os.path.join(final_checkpoint(scratch, args.steps), "model.pt")):
        # The distilled run's own config: the student's model section, data, recipe, steps and seed.
        config = os.path.join(final_checkpoint(distilled, args.steps), "config.yaml")
        run(["-m", "pretrain", "train", "--config", config, f"logging.run_dir={scratch}", "distill.teacher=null"])
    return final_checkpoint(distilled, args.steps), final_checkpoint(scratch, args.steps)


def forward_rate(ckpt: str, batch: int) -> tuple[int, int, float, float]:
    """(layers, parameters of the exported weights, forward sequences per second of wall time and per second of
    this process's CPU time: the second hardly moves when other processes share the cores)."""
    model, config, _ = load_model(ckpt)
    params = sum(t.numel() for t in model.consolidated_state_dict().values())
    batches = [{k: v for k, v in b.items() if k != "sentence_labels"}
               for b in make_batches(128, batch, config.model.vocab_size, count=4).padded]
    cpu_times: list[float] = []
    with torch.no_grad():
        times = time_steps(lambda i: model(**batches[i % len(batches)]), torch.device("cpu"), warmup=2, steps=10,
                           cpu_times=cpu_times)
    return config.model.num_layers, params, batch / statistics.median(times), batch / statistics.median(cpu_times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_out/distill")
    p.add_argument("--mb", type=float, default=2.0, help="MB of each corpus trained on")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint of ours instead of pretraining one")
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000, help="steps of each student, distilled and from scratch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=100)
    args = p.parse_args()
    args.work = os.path.abspath(args.work)
    data = prepare_data(args)
    teacher = args.teacher or train_teacher(args, data)
    distilled, scratch = train_students(args, data, teacher)
    distilled_eval, scratch_eval = (first_and_last_eval(os.path.join(args.work, n)) for n in ("distilled", "scratch"))
    teacher_accuracy = None if args.teacher else \
        first_and_last_eval(os.path.join(args.work, "teacher"))[args.teacher_steps]
    rows = [("teacher", teacher, teacher_accuracy),
            (f"student, distilled {args.steps} steps", distilled, distilled_eval[args.steps]),
            (f"student, from scratch {args.steps} steps", scratch, scratch_eval[args.steps])]
    print(f"\nheld-out MLM accuracy over {args.eval_batches} batches of {args.batch}; forward: eval mode, fp32, "
          f"batch {args.batch} x 128 tokens, {torch.get_num_threads()} CPU threads")
    print("| model | layers | parameters | forward seq/s | forward seq per CPU-s | held-out MLM accuracy |")
    print("|---|---|---|---|---|---|")
    for name, ckpt, accuracy in rows:
        layers, params, rate, cpu_rate = forward_rate(ckpt, args.batch)
        print(f"| {name} | {layers} | {params / 1e6:.2f} M | {rate:.1f} | {cpu_rate:.1f} | "
              f"{'-' if accuracy is None else f'{accuracy:.4f}'} |")
    print(f"\nat step 0, held-out MLM accuracy of the distilled student (the teacher's layers, as initialised): "
          f"{distilled_eval[0]:.4f}; of the scratch student (random weights): {scratch_eval[0]:.4f}")


if __name__ == "__main__":
    main()
