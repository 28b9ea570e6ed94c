"""Monitoring: TensorBoard scalars, a JSONL log, progress with ETA, throughput/MFU, a PNG; the optional
MLflow / W&B trackers (pretrain/trackers.py) get the same scalars and the config.

Only rank 0 writes.  Values arrive as plain floats already reduced across ranks.  Progress: a tqdm bar
when stderr is a terminal and ``progress_bar`` is on; otherwise (a SLURM log file, a pipe, or the bar off)
one plain line a logging window on stdout, which a file keeps readable (tqdm's carriage-return updates
make one endless line there).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from pretrain.trackers import TrackerError, open_trackers
from pretrain.weights import atomic_write_text

# Dense bf16/fp16 tensor-core peak TFLOP/s by device-name substring (first match wins).
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
    ("V100", 125.0), ("T4", 65.0),
]


def peak_tflops_for(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s for MFU: the override if given, else the table entry, else None (no MFU)."""
    if override:
        return override
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def throughput(seqs: int, tokens: int, seconds: float, flops_per_seq: float,
               peak_tflops: Optional[float], rows: int, slots: int) -> dict:
    """Over an interval: instances (``seq``) and real tokens a second, rows a second and the fill of
    their slots (real tokens / slots), achieved TFLOP/s and MFU (fraction of peak).  TFLOP/s counts
    ``flops_per_seq`` per row: one row per instance unpadded, fewer rows packed (the same instances on
    fewer FLOPs gives a packed run more instances a second, not more TFLOP/s)."""
    seconds = max(seconds, 1e-9)
    tflops = rows * flops_per_seq / seconds / 1e12
    out = {"perf/seq_per_s": seqs / seconds, "perf/tokens_per_s": tokens / seconds,
           "perf/rows_per_s": rows / seconds, "perf/fill": tokens / max(slots, 1), "perf/tflops": tflops}
    if peak_tflops:
        out["perf/mfu"] = tflops / peak_tflops
    return out


def open_logger(run_dir: str, device, **settings) -> "MetricsLogger":
    """``MetricsLogger(run_dir, **settings)`` on every rank of the job; when it cannot start on rank 0 (a tracker
    that cannot, a run dir it cannot write), rank 0's error there and TrackerError on the other ranks (they
    must not wait for rank 0 in the next collective)."""
    from pretrain.engine import agree

    logger = error = None
    try:
        logger = MetricsLogger(run_dir, **settings)
    except Exception as err:        # raised again here by agree: on the other ranks, the line below
        error = err
    agree(error, device, TrackerError("logging: the metrics logger (metrics.jsonl, TensorBoard, logging.trackers) "
                                      "could not start on rank 0 (its error says why)"))
    return logger


class MetricsLogger:
    """TensorBoard + JSONL + tqdm progress bar + the trackers that ``trackers`` (a logging section: its
    ``trackers`` list and their settings) names, on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str, *, rank: int, max_steps: int, start_step: int,
                 tensorboard: bool = True, progress_bar: bool = True, trackers=None):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        self.bar = None
        self.trackers = []
        if not self.enabled:
            return
        self.max_steps, self.began = max_steps, (time.time(), start_step)
        os.makedirs(run_dir, exist_ok=True)
        dropped = drop_rows_after(self.jsonl_path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if trackers is not None:
            self.trackers = open_trackers(trackers, run_dir, start_step, self.message)
        if dropped:
            self.message(f"{self.jsonl_path}: dropped {dropped} line(s) logged after step {start_step} by a run "
                         f"that stopped after its last checkpoint (or cut short); this run logs those steps anew")

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        now = time.time()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, scalars, now)
        record = {"kind": kind, "step": step, "time": now, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if kind != "train":
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('train/loss', float('nan')):.3f}",
                                 lr=f"{values.get('train/lr', 0.0):.2e}",
                                 seq_s=f"{values.get('perf/seq_per_s', 0.0):.1f}")
        else:
            print(progress_line(step, self.max_steps, values, *self.began), flush=True)

    def log_run(self, step: int, config: dict, world_size: int) -> None:
        """A ``kind: run`` row (each start of the run, at the step it starts from) with the resolved config
        and the run's metadata (run_metadata), both as TensorBoard text (``run/config``, ``run/metadata``) and to
        the trackers."""
        if not self.enabled:
            return
        meta = run_metadata(world_size)
        if self.writer is not None:
            import yaml
            self.writer.add_text("run/config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", step)
            self.writer.add_text("run/metadata", "```\n" + json.dumps(meta, indent=2) + "\n```", step)
        for tracker in self.trackers:
            tracker.log_run(config, meta)
        self.jsonl.write(json.dumps({"kind": "run", "step": step, "time": time.time(), **meta, "config": config}) + "\n")
        self.jsonl.flush()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.jsonl.close()


def run_metadata(world_size: int) -> dict:
    """Versions (bertforge, torch, deepspeed, transformers, Python), the world size, the host and the git
    commit of the checkout the code runs from (with ``-dirty`` for local changes; None outside a checkout)."""
    import importlib.metadata
    import platform
    import subprocess
    versions = {}
    for name in ("bertforge", "torch", "deepspeed", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = None
    try:
        out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"versions": versions, "world_size": world_size, "host": platform.node(), "git": commit}


def progress_line(step: int, max_steps: int, values: dict, began: float, start_step: int) -> str:
    """``step 120/1000 (12%)  loss 6.1234  lr 4.50e-03  180.2 seq/s  8,303 tok/s  loader wait 7 ms  ETA 1:21:05``:
    what the window's values hold; the ETA from this run's steps so far."""
    parts = [f"step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)"]
    for key, text in (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.2e}"), ("perf/seq_per_s", "{:.1f} seq/s"),
                      ("perf/tokens_per_s", "{:,.0f} tok/s")):
        if isinstance(values.get(key), (int, float)):
            parts.append(text.format(values[key]))
    if isinstance(values.get("perf/loader_wait_s"), (int, float)):
        parts.append(f"loader wait {1000 * values['perf/loader_wait_s']:.0f} ms")
    done = step - start_step
    if done > 0 and step < max_steps:
        left = (time.time() - began) / done * (max_steps - step)
        parts.append(f"ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
    return "  ".join(parts)


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of ``path`` past ``step``, the checkpoint a run resumes from (0: all rows),
    and unreadable lines; return how many lines went.  A run that stopped without a checkpoint of
    its last steps logged them, and the resumed run logs them again (TensorBoard: purge_step)."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if 0 <= _row_step(line) <= step] if step > 0 else []
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def _row_step(line: str) -> int:
    """The step of one JSONL row; -1 for a line cut short (the process died while writing it)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# One colour per series across the panels: (metrics.jsonl key, kind, label, colour, style).
CURVES = {
    "loss": [("train/loss", "train", "train total", "tab:gray", "-"), ("train/mlm_loss", "train", "train MLM", "tab:blue", "-"),
             ("train/sentence_loss", "train", "train NSP/SOP", "tab:orange", "-"),
             ("eval/mlm_loss", "eval", "held-out MLM", "tab:green", "o-")],
    "accuracy": [("train/mlm_accuracy", "train", "train MLM", "tab:blue", "-"),
                 ("train/sentence_accuracy", "train", "train NSP/SOP", "tab:orange", "-"),
                 ("eval/mlm_accuracy", "eval", "held-out MLM", "tab:green", "o-"),
                 ("eval/sentence_accuracy", "eval", "held-out NSP/SOP", "tab:red", "o-"),
                 ("downstream/average", "downstream", "downstream average (eval.downstream)", "tab:purple", "s--")],
    "learning rate": [("train/lr", "train", "lr", "tab:brown", "-")],
}


def plot_curves(jsonl_path: str, png_path: str) -> Optional[str]:
    """Loss, accuracy (train, held-out, downstream) and learning-rate curves from the JSONL log into one PNG,
    titled with the run directory's name and the model's size (from the log's latest ``run`` row)."""
    records = read_jsonl(jsonl_path) if os.path.exists(jsonl_path) else []
    if not any(r["kind"] == "train" for r in records):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, series) in zip(axes, CURVES.items()):
        for key, kind, label, colour, style in series:
            pts = sorted((r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None)
            if key == "downstream/average" and not all(0 <= v <= 1 for _, v in pts):
                continue            # a suite with SQuAD averages percentages: off this scale
            if pts:
                ax.plot(*zip(*pts), style, label=label, color=colour)
        ax.set(xlabel="step", ylabel=title, title=title.capitalize())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].set_ylim(0, 1)
    fig.suptitle(run_title(os.path.dirname(os.path.abspath(jsonl_path)), records))
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def run_title(run_dir: str, records: list) -> str:
    """``RUN_NAME: bert, 2 layers x 64, 0.66 M parameters`` (the name alone without a ``run`` row)."""
    runs = [r for r in records if r["kind"] == "run" and isinstance(r.get("config"), dict)]
    name = os.path.basename(run_dir)
    if not runs:
        return name
    try:
        import torch
        from pretrain.config import ModelConfig
        from pretrain.model import build_model
        m = ModelConfig(**runs[-1]["config"]["model"])
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(m).parameters())
    except (TypeError, ValueError, KeyError):
        return name
    return f"{name}: {m.arch}, {m.num_layers} layers x {m.hidden_size}, {params / 1e6:.2f} M parameters"
