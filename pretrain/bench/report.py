"""The run's outputs: JSON, a Markdown table inside docs/benchmarks.md, a PNG.

The Markdown goes between markers ``<!-- bench:train:<device type>:begin/end -->`` inside the
``## Training throughput`` section, so a rerun replaces only its own table (CPU and CUDA tables
live side by side) and leaves the prose around it and other sections of the file alone.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from pretrain.weights import atomic_write_text

SECTION = "## Training throughput"


def merge(runs: list[dict]) -> dict:
    """Several runs' JSON (e.g. one per model and sequence length on a GPU lease) as one report."""
    if not runs:
        raise ValueError("nothing to merge")
    meta = dict(runs[0]["meta"])
    if len(runs) > 1:
        meta["command"] = " ; ".join(r["meta"]["command"] for r in runs)
        meta["date"] = min(r["meta"]["date"] for r in runs)
        meta["load_avg_end"] = runs[-1]["meta"].get("load_avg_end")
        devices = {r["meta"]["device"] for r in runs}
        if len(devices) > 1:
            raise ValueError(f"runs from different devices cannot share a table: {sorted(devices)}")
    return {"meta": meta, "results": [x for r in runs for x in r["results"]],
            "ratios": [x for r in runs for x in r["ratios"]], "sweep": [x for r in runs for x in r["sweep"]]}


def write_json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


COLUMNS = ["model", "seq", "system", "micro batch", "step ms, median (IQR)", "CPU s/step", "seq/s",
           "real tokens/s", "TFLOP/s", "MFU", "peak mem GB", "host syncs/step", "ours/peer seq/s",
           "ours/peer paired"]
OPTIONAL = {"CPU s/step": "cpu_time_median_s", "host syncs/step": "host_syncs_per_step"}


def _cells(r: dict, ratio: Optional[dict]) -> dict:
    system = "HF peer" if r["system"] == "peer" else f"ours: {r['variant']}"
    cells = {"model": r["model"], "seq": str(r["seq_len"]), "system": system, "micro batch": str(r["micro_batch"])}
    if r["status"] != "ok":
        return cells | {"step ms, median (IQR)": r["status"]}
    syncs = r.get("host_syncs_per_step")
    return cells | {
        "step ms, median (IQR)": f"{r['median_s'] * 1e3:,.0f} ({r['p25_s'] * 1e3:,.0f}-{r['p75_s'] * 1e3:,.0f})",
        "CPU s/step": _fmt(r.get("cpu_time_median_s"), 2),
        "seq/s": _fmt(r["seq_per_s"]), "real tokens/s": _fmt(r["real_tokens_per_s"], 0),
        "TFLOP/s": _fmt(r["tflops"], 2), "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
        "peak mem GB": _fmt(r["peak_memory_gb"], 1), "host syncs/step": "-" if syncs is None else str(syncs),
        "ours/peer seq/s": "-" if ratio is None else f"{ratio['seq_per_s_ratio']:.2f}x",
        "ours/peer paired": "-" if not ratio or ratio["paired_seq_per_s_ratio"] is None
        else f"{ratio['paired_seq_per_s_ratio']:.2f}x",
    }


def markdown(data: dict) -> str:
    meta = data["meta"]
    ratio_of = {(x["model"], x["seq_len"], x["variant"]): x for x in data["ratios"]}
    columns = [c for c in COLUMNS
               if c not in OPTIONAL or any(r.get(OPTIONAL[c]) is not None for r in data["results"])]
    if not any(x.get("paired_seq_per_s_ratio") for x in data["ratios"]):
        columns.remove("ours/peer paired")
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"precision {meta['precision']}; {meta['warmup']} warm-up + {meta['steps']} timed steps"
        + (f" x {meta['rounds']} interleaved rounds" if meta["rounds"] > 1 else "")
        + f"; timing: {meta['timing']}; lengths: {meta.get('lengths', 'synthetic')}.",
        f"Date: {meta['date']}.  Load average (1/5/15 min) at start {meta['load_avg_start']}, "
        f"at end {meta.get('load_avg_end')}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in data["results"]:
        ratio = ratio_of.get((r["model"], r["seq_len"], r["variant"])) if r["system"] == "ours" else None
        cells = _cells(r, ratio)
        lines.append("| " + " | ".join(cells.get(c, "-") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def update_markdown(path: str, body: str, device_type: str) -> None:
    """Replace (or add) this device type's block inside the Training throughput section."""
    begin, end = f"<!-- bench:train:{device_type}:begin -->", f"<!-- bench:train:{device_type}:end -->"
    block = f"{begin}\n{body}{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        section, tail = (rest, "") if nxt < 0 else (rest[:nxt + 1], rest[nxt + 1:])
        text = head + SECTION + section.rstrip("\n") + "\n\n" + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def plot(data: dict, path: str) -> Optional[str]:
    """Sequences/s against micro batch, ours (default variant) and the peer, one panel per model/seq."""
    points: dict = {}
    for r in data["results"] + data["sweep"]:
        if r["status"] != "ok" or (r["system"] == "ours" and r["variant"] not in ("default", "default@peer-batch")):
            continue
        points.setdefault((r["model"], r["seq_len"]), {}).setdefault(r["system"], []).append(
            (r["micro_batch"], r["seq_per_s"], r["seq_per_s_iqr"]))
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for ax, ((model, seq_len), by_system) in zip(axes[0], sorted(points.items())):
        for system, label in (("ours", "ours (default)"), ("peer", "HF peer")):
            pts = sorted(by_system.get(system, []))
            if not pts:
                continue
            xs, ys, iqr = zip(*pts)
            lo = [y - a for y, (a, _) in zip(ys, iqr)]
            hi = [b - y for y, (_, b) in zip(ys, iqr)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="micro batch", ylabel="sequences / s", title=f"{model} / seq {seq_len}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training throughput, {data['meta']['device']} ({data['meta']['precision']})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
