"""Steady-state step timing, its statistics, and the largest-micro-batch search.

CUDA: a pair of events recorded around every step (recording is asynchronous, so the steps run
back to back with no host sync between them), one synchronize after the last step, then
``start.elapsed_time(end)`` per step.  CPU: ``time.perf_counter`` around every step (CPU ops run
synchronously).  Warm-up steps (module load, autotuning, torch.compile, allocator growth) are run
and discarded first.  Statistics are the median and the inter-quartile range of the steps.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], None], device: torch.device, *, warmup: int, steps: int,
               cpu_times: Optional[list] = None) -> list[float]:
    """Run ``warmup`` then ``steps`` steps (``step(i)`` runs step i); seconds of each timed step.

    On CPU, ``cpu_times`` (when given) receives each step's process CPU time too: with one
    thread it hardly moves when other processes share the cores, unlike the wall time.
    """
    for i in range(warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for i in range(steps):
        began, began_cpu = time.perf_counter(), time.process_time()
        step(warmup + i)
        times.append(time.perf_counter() - began)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - began_cpu)
    return times


def count_host_syncs(run: Callable[[], None], device: torch.device) -> Optional[int]:
    """Host synchronizations during ``run()`` (CUDA only: torch's sync debug mode warns on each
    ``.item()``, blocking copy, ``nonzero``...); None on CPU, where the question does not arise."""
    if device.type != "cuda":
        return None
    import warnings
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def summarize(times: list[float]) -> dict:
    """Median, quartiles, min and max of step times (seconds)."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_s": statistics.median(ordered), "p25_s": q1, "p75_s": q3, "min_s": ordered[0],
            "max_s": ordered[-1], "steps": len(ordered)}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def find_max_batch(fits: Callable[[int], bool], *, start: int, limit: int, multiple: int = 8) -> Optional[int]:
    """Largest micro batch b <= ``limit`` (a multiple of ``multiple`` once above it) with ``fits(b)``.

    Doubling from ``start`` until the first failure (or ``limit``), then bisection between the
    last size that fit and the first that did not.  ``fits`` runs a few training steps at that
    size and returns False on out-of-memory.  None if even ``start`` does not fit.
    """
    good, bad, b = None, None, start
    while b <= limit:
        if fits(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    if good is None:
        return None
    if bad is None:                 # every doubling up to the limit fit
        if good == limit or fits(limit):
            return limit
        bad = limit
    hi = bad
    while hi - good > multiple:
        mid = (good + hi) // 2 // multiple * multiple
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            hi = mid
    return good
