"""Peak memory and step time of training steps with training.activation_checkpointing off and on.
Not a test; run it for the table (docs/performance.md, "Activation checkpointing"):

    .venv/bin/python bench/activation_memory.py [--model mini] [--seq-len 512] [--micro 2 4 8]
        [--budget-gb 1.5] [--precision fp32] [--steps 2] [--threads 2]

Each case is a full training step of ``pretrain.bench``'s ``ours`` system (build_model, the sparse MLM
head, LAMB) on its synthetic NSP batches, the encoder's ``activation_checkpointing`` set as the setting
sets it; one warm-up step, then ``--steps`` timed (the median is reported: of the step time on CUDA, of
the process CPU time of a step on CPU, which a loaded machine hardly moves; with ``--threads 1`` it is
proportional to the work done).

* CPU: each case runs in a fresh subprocess, which reports its peak resident set size
  (``resource.getrusage``'s ru_maxrss) and the same figure just after the model, optimizer and batches
  were built: ``above build`` is their difference (activations, gradients, optimizer state, workspace).
  The subprocess gets ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps large tensors and unmaps them
  when freed instead of keeping them in its heap: the RSS then follows the live tensors.  The largest
  micro batch within ``--budget-gb`` of peak RSS is searched on measured peaks: up to three secant steps
  (memory grows linearly with the micro batch: a line through the two peaks nearest the budget, and a
  run at the micro batch where it meets the budget); the largest measured one within the budget is shown.
* CUDA: in process, ``torch.cuda.max_memory_allocated`` (peak) and ``memory_allocated`` after the
  build; the largest micro batch is searched (doubling, then bisection, ``pretrain.bench.timing.
  find_max_batch``) until out of memory, the process limited to ``--budget-gb`` with
  ``torch.cuda.set_per_process_memory_fraction`` (default: the whole device).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.bench.batches import make_batches  # noqa: E402
from pretrain.bench.systems import OursStep, Variant, model_config, to_device  # noqa: E402
from pretrain.bench.timing import find_max_batch, free_memory, is_oom, synchronize, time_steps  # noqa: E402

MiB = 2**20


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB   # Linux: ru_maxrss in KiB


def measure(args, micro: int, checkpointing: bool, device: torch.device) -> dict:
    """{"peak_mib", "build_mib", "step_s"} of one case, in this process; {"oom": True} on out of memory.
    ``step_s``: the median step time on CUDA, the median process CPU time of a step on CPU."""
    cuda = device.type == "cuda"
    step = batches = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = OursStep(model_config(args.model), Variant(), args.precision, device)
        step.model.encoder.activation_checkpointing = checkpointing
        batches = to_device(make_batches(args.seq_len, micro, step.model.config.vocab_size, count=2).padded, device)
        synchronize(device)
        build = torch.cuda.memory_allocated(device) / MiB if cuda else rss_mib()
        cpu_times = [] if not cuda else None
        times = time_steps(lambda i: step(batches[i % 2]), device, warmup=1, steps=args.steps, cpu_times=cpu_times)
        peak = torch.cuda.max_memory_allocated(device) / MiB if cuda else rss_mib()
        # CPU: the process CPU time of a step too, which other processes on the cores hardly move
        return {"peak_mib": peak, "build_mib": build, "step_s": statistics.median(cpu_times or times)}
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        return {"oom": True}
    finally:
        del step, batches
        free_memory(device)


def run_case(args, micro: int, checkpointing: bool, device: torch.device) -> dict:
    if device.type == "cuda":
        return measure(args, micro, checkpointing, device)
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--seq-len", str(args.seq_len),
           "--micro", str(micro), "--precision", args.precision, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"worker {' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_micro(args, checkpointing: bool, rows: list[dict], device: torch.device) -> str:
    """The largest micro batch within --budget-gb, and how it was found."""
    if device.type == "cuda":
        best = find_max_batch(lambda b: "oom" not in measure(args, b, checkpointing, device),
                              start=min(args.micro), limit=args.batch_limit)
        return f"{best} (largest without out-of-memory; doubling, then bisection to a multiple of 8)"
    budget = args.budget_gb * 1024
    peaks = {r["micro"]: r[checkpointing]["peak_mib"] for r in rows}
    for _ in range(3):   # secant steps: a line through the two peaks nearest the budget, then measure there
        (b0, p0), (b1, p1) = sorted(sorted(peaks.items(), key=lambda kv: abs(kv[1] - budget))[:2])
        guess = b1 if p1 == p0 else int(b0 + (budget - p0) * (b1 - b0) / (p1 - p0))
        if guess in peaks and peaks[guess] <= budget:
            guess += 1                  # the line's answer fits: try one more, to bracket the answer
        if guess < 1 or guess in peaks:
            break
        peaks[guess] = run_case(args, guess, checkpointing, device)["peak_mib"]
    within = [b for b, p in peaks.items() if p <= budget]
    over = [b for b, p in peaks.items() if p > budget]
    if not within:
        return f"none measured (smallest tried, {min(peaks)}, peaks at {peaks[min(peaks)]:.0f} MiB)"
    best = max(within)
    above = min((b for b in over if b > best), default=None)
    return (f"{best} (measured peak {peaks[best]:.0f} MiB" +
            (f"; {above} measured {peaks[above]:.0f} MiB" if above else "") + "; secant search on measured peaks)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="a pretrain.bench model: tiny, mini, base, large")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory budget of the largest-micro-batch search (CPU: peak RSS, GiB; required there)")
    parser.add_argument("--batch-limit", type=int, default=1024, help="CUDA search: largest micro batch tried")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch threads of each case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args, args.micro[0], args.checkpointing, device)))
        return 0
    if device.type == "cpu" and args.budget_gb is None:
        parser.error("--budget-gb is required on CPU (the peak-RSS budget of the largest micro batch)")
    if device.type == "cuda" and args.budget_gb is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * 2**30 / total), device)
    figure = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss), fresh process"
    timing = "step time" if device.type == "cuda" else f"process CPU time of a step ({args.threads} threads)"
    print(f"model {args.model}, seq {args.seq_len}, {args.precision}, {device.type}; memory: {figure}; "
          f"step s: {timing}, median of {args.steps} steps after 1 warm-up")
    rows = []
    for micro in args.micro:
        rows.append({"micro": micro, **{c: run_case(args, micro, c, device) for c in (False, True)}})
    print("\n| micro batch | peak off, MiB | peak on, MiB | above build off | above build on | saved | "
          "step s off | step s on | time cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        off, on = r[False], r[True]
        if "oom" in off or "oom" in on:
            print(f"| {r['micro']} | {'OOM' if 'oom' in off else round(off['peak_mib'])} | "
                  f"{'OOM' if 'oom' in on else round(on['peak_mib'])} | | | | | | |")
            continue
        extra_off, extra_on = off["peak_mib"] - off["build_mib"], on["peak_mib"] - on["build_mib"]
        print(f"| {r['micro']} | {off['peak_mib']:.0f} | {on['peak_mib']:.0f} | {extra_off:.0f} | {extra_on:.0f} | "
              f"{1 - extra_on / extra_off:.0%} | {off['step_s']:.2f} | {on['step_s']:.2f} | "
              f"{on['step_s'] / off['step_s'] - 1:+.0%} |")
    rows = [r for r in rows if "oom" not in r[False] and "oom" not in r[True]]
    budget = f"{args.budget_gb} GiB" if args.budget_gb is not None else "the device"
    print(f"\nlargest micro batch within {budget}:")
    for checkpointing in (False, True):
        answer = largest_micro(args, checkpointing, rows, device)
        print(f"  checkpointing {'on ' if checkpointing else 'off'}: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
