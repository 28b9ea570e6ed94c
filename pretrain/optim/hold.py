"""Optimizers whose ``step()`` can be held: while held, it changes nothing (no state, no update).

The training engine steps the optimizer through DeepSpeed, which calls ``step()`` itself, so a
step that must not happen is held rather than not called:

* a step whose loss was not finite on some rank (for fp32/bf16 DeepSpeed has no overflow check
  covering every ZeRO stage, and a non-finite gradient would poison the weights);
* the step DeepSpeed's fp16 wrapper without ZeRO takes inside ``deepspeed.initialize`` on all-zero
  gradients to create the optimizer state (AdamW and LAMB would still apply weight decay and count
  a step; held, the state is created at the first real step, as without DeepSpeed).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch


def _holdable(step: Callable) -> Callable:
    @functools.wraps(step)
    def held_or_step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if self._held:
            return None
        return step(self, closure)
    return held_or_step


class HoldableStep:
    """Mixin for a ``torch.optim.Optimizer`` subclass (put it first among the bases): the ``step``
    it inherits, or one a subclass defines, does nothing while held."""

    _held = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:          # a subclass's own step would bypass the mixin's
            cls.step = _holdable(cls.__dict__["step"])

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if self._held:
            return None
        return super().step(closure)

    @contextlib.contextmanager
    def held(self, hold: bool = True) -> Iterator[None]:
        """Within (when ``hold``): every ``step()`` returns None and changes nothing."""
        previous = self._held
        self._held = previous or hold
        try:
            yield
        finally:
            self._held = previous


class AdamW(HoldableStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` with a holdable step."""
