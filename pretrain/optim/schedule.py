"""Learning-rate schedules: linear warmup, then decay measured from the END of warmup.

``peak * lr_multiplier(step)`` is the learning rate of optimizer update number ``step`` (0-based;
equivalently the rate after ``step`` scheduler steps):

* warmup, ``step < W``: ``peak * step / W`` (the first update runs at 0 and still warms the moments);
* decay, ``W <= step <= T``: with ``progress = (step - W) / (T - W)`` in [0, 1],
  ``peak * (min_ratio + (1 - min_ratio) * shape(progress))`` where ``shape`` is
  ``(1 - x) ** power`` (poly), ``1 - x`` (linear), ``(1 + cos(pi x)) / 2`` (cosine) or 1 (constant);
* after ``T``: ``peak * min_ratio`` (constant: ``peak``).

Both pieces equal ``peak`` at ``step == W``, so the rate never jumps at the end of warmup.
(NVIDIA's DeepLearningExamples BERT computes the polynomial decay from step 0, so its rate drops
at the end of warmup; this schedule deliberately does not.)
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import ScheduleConfig

DECAYS = ("poly", "linear", "cosine", "constant")
DEFAULT_WARMUP_RATIO = 0.01


def resolve_warmup_steps(sched_cfg: ScheduleConfig, max_steps: int) -> int:
    """``warmup_steps`` when set, else ``round(warmup_ratio * max_steps)`` (ratio 0.01 when neither
    is set; the config refuses both); always < max_steps."""
    if sched_cfg.warmup_steps is not None:
        warmup = int(sched_cfg.warmup_steps)
    else:
        ratio = DEFAULT_WARMUP_RATIO if sched_cfg.warmup_ratio is None else sched_cfg.warmup_ratio
        warmup = int(round(ratio * max_steps))
    if not 0 <= warmup < max_steps:
        raise ValueError(f"warmup of {warmup} steps must be in [0, max_steps={max_steps})")
    return warmup


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, decay: str = "poly", power: float = 1.0,
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate of update ``step`` as a fraction of the peak (see the module docstring)."""
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}: expected one of {', '.join(DECAYS)}")
    if not 0 <= warmup_steps < max_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < max_steps ({max_steps})")
    if step < warmup_steps:
        return step / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if decay == "poly":
        shape = (1.0 - progress) ** power
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class WarmupDecay:
    """Picklable ``LambdaLR`` multiplier; its settings travel in the scheduler's ``state_dict``."""

    def __init__(self, warmup_steps: int, max_steps: int, decay: str, power: float, min_lr_ratio: float):
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.decay, self.power, self.min_lr_ratio = decay, power, min_lr_ratio
        lr_multiplier(0, **self._kwargs())  # validate now rather than at the first step

    def _kwargs(self) -> dict:
        return dict(warmup_steps=self.warmup_steps, max_steps=self.max_steps, decay=self.decay,
                    power=self.power, min_lr_ratio=self.min_lr_ratio)

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, **self._kwargs())


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: ScheduleConfig, max_steps: int) -> LambdaLR:
    """A ``LambdaLR`` scaling each group's configured lr (the peak) by :func:`lr_multiplier`.

    Call ``scheduler.step()`` once after every optimizer update; ``state_dict()`` /
    ``load_state_dict()`` resume it exactly (the step count and the schedule's settings).
    """
    return LambdaLR(optimizer, _multiplier(sched_cfg, max_steps))


def _multiplier(sched_cfg: ScheduleConfig, max_steps: int) -> WarmupDecay:
    return WarmupDecay(resolve_warmup_steps(sched_cfg, max_steps), max_steps, sched_cfg.decay, sched_cfg.power,
                       sched_cfg.min_lr_ratio)


def extend_schedule(scheduler: LambdaLR, sched_cfg: ScheduleConfig, max_steps: int) -> tuple[float, float]:
    """A resumed scheduler (its state the checkpoint's, schedule and all) recomputed for a run extended to
    ``max_steps``: warmup and decay follow the longer schedule from the current step on, the next update
    included.  Returns the first group's rate (before, after)."""
    before = scheduler.get_last_lr()[0]
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.lr_lambdas[i] = _multiplier(sched_cfg, max_steps)
        group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return before, scheduler.get_last_lr()[0]
