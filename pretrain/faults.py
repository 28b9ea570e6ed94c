"""Faults the tests inject into a training run, behind one seam (``pretrain train --fault SPEC``,
hidden from ``--help``).  Production code consults a :class:`Faults` at two points only: the
engine passes each step's loss through :meth:`Faults.loss`, and a checkpoint save calls
:meth:`Faults.during_save` between writing its files and committing them.  ``NO_FAULTS`` (the
default) changes nothing.

SPEC:
  ``kill-during-save@STEP``  the process ends at once (exit 137, as if killed) in the middle of
                             the checkpoint save of step STEP;
  ``nan-loss@A`` / ``nan-loss@A-B``  the loss of steps A..B is not finite.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

KILLED_EXIT = 137


@dataclass(frozen=True)
class Faults:
    kill_during_save: Optional[int] = None
    nan_loss: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, spec: Optional[str]) -> "Faults":
        if not spec:
            return NO_FAULTS
        name, at, steps = spec.partition("@")
        first, _, last = steps.partition("-")
        if not at or not first.isdigit() or not (last or first).isdigit():
            raise ValueError(f"--fault {spec!r}: expected kill-during-save@STEP or nan-loss@A[-B]")
        if name == "kill-during-save" and not last:
            return cls(kill_during_save=int(first))
        if name == "nan-loss":
            return cls(nan_loss=frozenset(range(int(first), int(last or first) + 1)))
        raise ValueError(f"--fault {spec!r}: expected kill-during-save@STEP or nan-loss@A[-B]")

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of optimizer step ``step`` (counted from 1), made NaN where asked."""
        return loss * float("nan") if step in self.nan_loss else loss

    def during_save(self, step: int) -> None:
        if step == self.kill_during_save:
            os._exit(KILLED_EXIT)


NO_FAULTS = Faults()
