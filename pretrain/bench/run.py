"""The cases of one benchmark run: per (model, seq_len), ours in each variant and the HF peer.

Every case gets the same pre-drawn batches (staged on the device before timing, so data loading
is not in the numbers: in training the loader runs in worker processes, overlapped).  With
``rounds`` > 1 the cases are measured in interleaved rounds (ours, peer, ours, peer, ...) and the
step times pooled, so a change of machine load while the run goes on hits every case alike: on a
shared CPU this matters more than the number of steps.

Throughput of a case: sequences per second = instances per step (``micro_batch``, packed or not:
a packed step holds the same instances in fewer rows, as ``data.packing`` does in training) /
median step time; tokens/s counts the row slots (padding included; a packed batch's rows are as
wide as its fullest row, rounded up to ``data.pad_to_multiple_of``), real tokens/s only the
instances' tokens, ``real_token_fraction`` the ratio of the two; rows per step are ``micro_batch``
unpacked and the mean over the batches packed (they vary by batch); TFLOP/s = rows/s x
``flops_per_sequence`` (the anchors' formula: MLM head at 15% of positions, a row counted as a full
seq_len sequence, as training's ``perf/tflops``) for ours and the peer alike, so MFU compares
useful work, not what the dense head spends.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from pretrain.bench import batches as batch_lib
from pretrain.bench import systems
from pretrain.bench.timing import (count_host_syncs, find_max_batch, free_memory, is_oom, summarize, synchronize,
                                   time_steps)


@dataclass
class Spec:
    models: list[str]
    seq_lens: list[int]
    variants: list[systems.Variant]
    micro_batch: Optional[int] = None     # None: the largest that fits (CUDA), 32 on CPU
    peer: bool = True
    precision: Optional[str] = None       # None: bf16 on CUDA, fp32 on CPU
    warmup: int = 3
    steps: int = 20
    rounds: int = 1
    round_warmup: int = 1                 # untimed steps at the start of each later round
    sweep: Optional[list[int]] = None     # micro batches for the throughput-vs-batch plot ([] = none)
    sweep_steps: Optional[int] = None
    batch_limit: int = 1024
    batch_count: int = 4                  # distinct batches the steps rotate through
    device: str = "auto"
    peak_tflops: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    lengths_from: Optional[str] = None    # a shard directory whose instance lengths the batches copy
    log: bool = True


@dataclass
class Case:
    system: str                            # ours | peer
    model: str
    seq_len: int
    micro_batch: int
    variant: systems.Variant = field(default_factory=systems.Variant)
    label: str = ""                        # e.g. "default@peer-batch"
    sweep: bool = False                    # a point of the throughput-vs-batch plot only

    @property
    def name(self) -> str:
        return self.label or (self.variant.name if self.system == "ours" else "hf-peer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Runner:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.precision = spec.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.batch_sets: dict = {}
        self.lengths: dict = {}
        self.alive: dict = {}              # (system, model, variant) -> step object, kept between rounds

    def say(self, text: str) -> None:
        if self.spec.log:
            print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # -- building blocks -----------------------------------------------------------------
    def batch_set(self, model: str, seq_len: int, micro_batch: int, count: Optional[int] = None):
        count = count or self.spec.batch_count
        key = (model, seq_len, micro_batch, count)
        if key not in self.batch_sets:
            packed = any(v.packing for v in self.spec.variants)
            bs = batch_lib.make_batches(seq_len, micro_batch, systems.model_config(model).vocab_size, count=count,
                                        seed=self.spec.seed, packed=packed, lengths=self.lengths_for(seq_len))
            bs.padded, bs.peer, bs.packed = (systems.to_device(x, self.device) for x in (bs.padded, bs.peer, bs.packed))
            self.batch_sets[key] = bs
        return self.batch_sets[key]

    def lengths_for(self, seq_len: int):
        if not self.spec.lengths_from:
            return None
        if seq_len not in self.lengths:
            self.lengths[seq_len] = batch_lib.read_shard_lengths(self.spec.lengths_from, seq_len)
        return self.lengths[seq_len]

    def system(self, case: Case):
        key = (case.system, case.model, case.variant)
        if key not in self.alive:
            torch.manual_seed(self.spec.seed)
            self.alive[key] = systems.build_system(case.system, systems.model_config(case.model), case.variant,
                                                   self.precision, self.device)
        return self.alive[key]

    def release(self, case: Optional[Case] = None) -> None:
        if case is None:
            self.alive.clear()
        else:
            self.alive.pop((case.system, case.model, case.variant), None)
        free_memory(self.device)

    def step_fn(self, case: Case, step, bs):
        if case.system == "peer":
            return lambda i: step(bs.peer[i % len(bs.peer)])
        return lambda i: step(systems.ours_batch(bs, i, case.variant))

    def fits(self, case: Case, micro_batch: int) -> bool:
        """Two training steps at this micro batch without running out of device memory."""
        bs = None
        try:
            step = self.system(case)
            bs = self.batch_set(case.model, case.seq_len, micro_batch, count=2)
            fn = self.step_fn(dataclasses.replace(case, micro_batch=micro_batch), step, bs)
            fn(0)
            fn(1)
            synchronize(self.device)
            ok = True
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            ok = False
        self._zero_grads(case)
        self.batch_sets.pop((case.model, case.seq_len, micro_batch, 2), None)
        del bs
        free_memory(self.device)
        self.say(f"  {case.system} {case.model}/{case.seq_len} micro batch {micro_batch}: "
                 f"{'fits' if ok else 'out of memory'}")
        return ok

    def _zero_grads(self, case: Case) -> None:
        step = self.alive.get((case.system, case.model, case.variant))
        model = getattr(step, "model", None)
        if model is not None:
            model.zero_grad(set_to_none=True)

    def largest_batch(self, case: Case) -> Optional[int]:
        if self.device.type != "cuda":
            raise ValueError("the largest-micro-batch search needs CUDA; give --micro-batch on CPU")
        self.say(f"searching the largest micro batch of {case.system} {case.model}/{case.seq_len}")
        start = 8 if case.seq_len <= 128 else 4
        best = find_max_batch(lambda b: self.fits(case, b), start=start, limit=self.spec.batch_limit)
        self.release(case)
        return best

    # -- measuring -------------------------------------------------------------------------
    def measure(self, case: Case, *, warmup: int, steps: int, record: Optional[dict] = None) -> dict:
        """Time one case (adds to ``record`` when measuring another round of it)."""
        record = record if record is not None else self._new_record(case)
        if record["status"] != "ok":
            return record
        load_before = os.getloadavg()[0]
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            began = time.perf_counter()
            step = self.system(case)
            record["build_s"] = record.get("build_s", 0.0) + time.perf_counter() - began
            bs = self.batch_set(case.model, case.seq_len, case.micro_batch)
            offset = record["steps_run"]
            fn = self.step_fn(case, step, bs)
            began = time.perf_counter()
            times = time_steps(lambda i: fn(offset + i), self.device, warmup=warmup, steps=steps,
                               cpu_times=record["cpu_times_s"] if self.device.type == "cpu" else None)
            record["wall_s"] += time.perf_counter() - began
            record["steps_run"] += warmup + steps
            record["times_s"] += times
            record["round_medians_s"].append(statistics.median(times))
            if self.device.type == "cuda" and "host_syncs_per_step" not in record:
                step_index = offset + warmup + steps
                record["host_syncs_per_step"] = count_host_syncs(lambda: fn(step_index), self.device)
                record["steps_run"] += 1
            if self.device.type == "cuda":
                # Everything allocated on the device: with rounds == 1 (the GPU default) this case's
                # system is the only one in memory; with more rounds the others kept alive count too.
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                record["peak_memory_gb"] = max(record.get("peak_memory_gb") or 0.0, peak)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            record["status"] = "oom"
            self._zero_grads(case)
            self.release(case)
        record["load_avg_1m"].append([round(load_before, 2), round(os.getloadavg()[0], 2)])
        return record

    def _new_record(self, case: Case) -> dict:
        return {"system": case.system, "model": case.model, "seq_len": case.seq_len,
                "micro_batch": case.micro_batch, "variant": case.name, "precision": self.precision,
                "status": "ok", "times_s": [], "round_medians_s": [], "cpu_times_s": [], "steps_run": 0,
                "wall_s": 0.0, "load_avg_1m": [], "peak_memory_gb": None}

    def finish(self, record: dict, case: Case) -> dict:
        """Statistics and throughput from the pooled step times."""
        if record["status"] != "ok" or not record["times_s"]:
            return record
        stats = summarize(record["times_s"])
        bs = self.batch_set(case.model, case.seq_len, case.micro_batch)
        packed = case.system == "ours" and case.variant.packing
        median = stats["median_s"]
        seqs = case.micro_batch                  # instances per step, packed or not
        rows, slots, real = bs.mean_rows(packed), bs.mean_slots(packed), bs.mean_real_tokens()
        flops = _flops(case.model, case.seq_len)
        peak = _peak(self.device, self.spec.peak_tflops)
        tflops = rows * flops / median / 1e12
        record.update(stats)
        if record["cpu_times_s"]:
            record["cpu_time_median_s"] = summarize(record["cpu_times_s"])["median_s"]
        record.update({
            "seq_per_s": seqs / median, "rows_per_s": rows / median,
            "seq_per_s_iqr": [seqs / stats["p75_s"], seqs / stats["p25_s"]],
            "tokens_per_s": slots / median,
            "real_tokens_per_s": real / median,
            "real_token_fraction": real / slots,
            "sequences_per_step": seqs, "rows_per_step": rows, "slots_per_step": slots,
            "tflops": tflops, "mfu": tflops / peak if peak else None,
            "flops_per_sequence": flops,
        })
        return record

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> dict:
        spec = self.spec
        meta = self._meta()
        results, ratios, sweep = [], [], []
        for model in spec.models:
            for seq_len in spec.seq_lens:
                cases = self._cases(model, seq_len)
                cases += self._sweep_cases(model, seq_len, cases)
                records = {id(c): None for c in cases}
                for r in range(spec.rounds):
                    for i, case in enumerate(cases):
                        steps = (spec.sweep_steps or spec.steps) if case.sweep else spec.steps
                        warm = spec.warmup if r == 0 else spec.round_warmup
                        self.say(f"round {r + 1}/{spec.rounds}: {case.system} {case.name} {model}/{seq_len} "
                                 f"micro batch {case.micro_batch}")
                        records[id(case)] = self.measure(case, warmup=warm, steps=steps, record=records[id(case)])
                        following = cases[i + 1] if i + 1 < len(cases) else None
                        if spec.rounds == 1 and (following is None or _key(following) != _key(case)):
                            self.release(case)   # one system in memory at a time (GPU memory, peak figures)
                done = [self.finish(records[id(c)], c) for c in cases]
                results += [r for r, c in zip(done, cases) if not c.sweep]
                sweep += [r for r, c in zip(done, cases) if c.sweep]
                ratios += _ratios([r for r, c in zip(done, cases) if not c.sweep])
                self.release()
                self.batch_sets.clear()
        if any(v.kernels == "ops" for v in spec.variants):
            from pretrain.ops import extension_status
            meta["ops_extension"] = extension_status()   # whether the ops variant ran CUDA kernels
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        return {"meta": meta, "results": results, "ratios": ratios, "sweep": sweep}

    def _cases(self, model: str, seq_len: int) -> list[Case]:
        spec = self.spec
        default = systems.Variant()
        if spec.micro_batch:
            ours_batch = peer_batch = spec.micro_batch
        elif self.device.type != "cuda":
            ours_batch = peer_batch = 32
        else:
            ours_batch = self.largest_batch(Case("ours", model, seq_len, 0, default)) or 0
            peer_batch = self.largest_batch(Case("peer", model, seq_len, 0)) if spec.peer else ours_batch
            peer_batch = peer_batch or 0
        cases = [Case("ours", model, seq_len, ours_batch, v) for v in spec.variants if ours_batch]
        if spec.peer and peer_batch:
            cases.append(Case("peer", model, seq_len, peer_batch))
            if peer_batch != ours_batch and default in spec.variants:
                cases.append(Case("ours", model, seq_len, peer_batch, default, label="default@peer-batch"))
        return cases

    def _sweep_cases(self, model: str, seq_len: int, cases: list[Case]) -> list[Case]:
        """Ours (default variant) and the peer at other micro batches, for the plot."""
        spec = self.spec
        if spec.sweep == []:
            return []
        out = []
        for system in ("ours", "peer") if spec.peer else ("ours",):
            measured = [c.micro_batch for c in cases if c.system == system and c.variant == systems.Variant()]
            top = max(measured, default=0)
            sizes = spec.sweep if spec.sweep is not None else [2 ** k for k in range(2, 16) if 2 ** k < top]
            out += [Case(system, model, seq_len, b, sweep=True) for b in sizes if b not in measured]
        return out

    def _meta(self) -> dict:
        import transformers
        spec = self.spec
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m pretrain bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                               else sys.argv[1:]),
            "device": device_name(self.device), "device_type": self.device.type,
            "hostname_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if self.device.type == "cuda" else None,
            "precision": self.precision, "warmup": spec.warmup, "steps": spec.steps, "rounds": spec.rounds,
            "peak_tflops": _peak(self.device, spec.peak_tflops),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "timing": "cuda events per step" if self.device.type == "cuda" else "time.perf_counter per step",
            "lengths": f"from the shards in {spec.lengths_from}" if spec.lengths_from
            else "synthetic: BERT's NSP length rule, long documents",
        }


def _key(case: Case) -> tuple:
    return case.system, case.model, case.variant


def _flops(model: str, seq_len: int) -> float:
    from pretrain.model import flops_per_sequence
    return flops_per_sequence(systems.model_config(model), seq_len)


def _peak(device: torch.device, override: Optional[float]) -> Optional[float]:
    from pretrain.metrics import peak_tflops_for
    if device.type != "cuda":
        return override
    return peak_tflops_for(torch.cuda.get_device_name(device), override)


def _ratios(records: list[dict]) -> list[dict]:
    """ours / peer sequences per second (and real tokens per second) for each of our cases.

    ``paired_seq_per_s_ratio``: with several rounds, the median over rounds of the ratio within
    each round (cases measured minutes apart see different loads on a shared machine; within a
    round they are adjacent), the figure to trust on a busy CPU."""
    peer = next((r for r in records if r["system"] == "peer" and r["status"] == "ok"), None)
    if peer is None:
        return []
    out = []
    for r in records:
        if r["system"] != "ours" or r["status"] != "ok":
            continue
        out.append({"model": r["model"], "seq_len": r["seq_len"], "variant": r["variant"],
                    "ours_micro_batch": r["micro_batch"], "peer_micro_batch": peer["micro_batch"],
                    "seq_per_s_ratio": r["seq_per_s"] / peer["seq_per_s"],
                    "real_tokens_per_s_ratio": r["real_tokens_per_s"] / peer["real_tokens_per_s"],
                    "paired_seq_per_s_ratio": _paired(r, peer)})
    return out


def _paired(ours: dict, peer: dict) -> Optional[float]:
    pairs = list(zip(ours["round_medians_s"], peer["round_medians_s"]))
    if len(pairs) < 2:
        return None
    per_step = ours["sequences_per_step"] / peer["sequences_per_step"]
    return statistics.median(p / o for o, p in pairs) * per_step
