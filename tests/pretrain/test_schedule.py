"""LR schedules: warmup then decay from the end of warmup, no jump, exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ScheduleConfig
from pretrain.optim import build_scheduler, lr_multiplier, resolve_warmup_steps

DECAYS = ["poly", "linear", "cosine", "constant"]


def _lrs(decay, warmup=10, total=100, power=0.5, min_ratio=0.0, peak=1.0):
    return [peak * lr_multiplier(s, warmup_steps=warmup, max_steps=total, decay=decay, power=power,
                                 min_lr_ratio=min_ratio) for s in range(total + 1)]


@pytest.mark.parametrize("decay", DECAYS)
def test_endpoints(decay):
    lrs = _lrs(decay, warmup=10, total=100, min_ratio=0.1, peak=2.0)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(1.0)  # halfway through warmup
    assert lrs[10] == 2.0  # peak exactly at the end of warmup
    assert lrs[100] == pytest.approx(2.0 if decay == "constant" else 0.2)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_no_jump_at_the_end_of_warmup(decay, power):
    """Both pieces give the peak at step W, and the first decay steps are as small as later ones."""
    warmup, total = 10, 100
    lrs = _lrs(decay, warmup, total, power=power)
    assert lrs[warmup] == 1.0
    assert lrs[warmup - 1] == pytest.approx(1.0 - 1.0 / warmup)
    first_decay_step = lrs[warmup] - lrs[warmup + 1]
    if decay == "constant":
        assert first_decay_step == 0.0
    else:
        # exact value of the continuous shape one step into the decay: no offset from step 0
        progress = 1.0 / (total - warmup)
        shape = {"poly": (1 - progress) ** power, "linear": 1 - progress,
                 "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[decay]
        assert lrs[warmup + 1] == pytest.approx(shape)
        assert 0.0 <= first_decay_step < 0.1


def test_decay_from_step_zero_would_jump():
    """What this schedule avoids (DeepLearningExamples' poly decay measured from step 0)."""
    warmup, total, power = 30, 100, 0.5
    dle = (1 - warmup / total) ** power  # LR right after warmup with decay measured from step 0
    ours = _lrs("poly", warmup, total, power=power)
    assert 1.0 - dle > 0.15
    assert ours[warmup] == 1.0 and 1.0 - ours[warmup + 1] < 0.02


@pytest.mark.parametrize("decay", DECAYS)
def test_monotone_and_bounded_by_min_lr(decay):
    lrs = _lrs(decay, warmup=7, total=60, power=2.0, min_ratio=0.25)
    warm, rest = lrs[:8], lrs[7:]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(rest, rest[1:]))
    assert min(rest) >= 0.25 - 1e-12
    assert lr_multiplier(1000, warmup_steps=7, max_steps=60, decay=decay, min_lr_ratio=0.25) == \
        pytest.approx(1.0 if decay == "constant" else 0.25)


def test_no_warmup_starts_at_peak():
    assert lr_multiplier(0, warmup_steps=0, max_steps=10, decay="linear") == 1.0
    assert lr_multiplier(5, warmup_steps=0, max_steps=10, decay="linear") == 0.5


def test_poly_power_one_is_linear():
    for s in range(0, 51):
        assert lr_multiplier(s, warmup_steps=5, max_steps=50, decay="poly", power=1.0) == pytest.approx(
            lr_multiplier(s, warmup_steps=5, max_steps=50, decay="linear"))


def test_warmup_steps_take_precedence_over_ratio():
    assert resolve_warmup_steps(ScheduleConfig(warmup_steps=7, warmup_ratio=0.5), 100) == 7
    assert resolve_warmup_steps(ScheduleConfig(warmup_ratio=0.25), 100) == 25
    assert resolve_warmup_steps(ScheduleConfig(warmup_ratio=0.0), 100) == 0
    with pytest.raises(ValueError):
        resolve_warmup_steps(ScheduleConfig(warmup_steps=100), 100)
    with pytest.raises(ValueError):
        lr_multiplier(0, warmup_steps=1, max_steps=10, decay="exp")


def _scheduler(peak=0.5, **cfg):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    return opt, build_scheduler(opt, ScheduleConfig(**cfg), max_steps=40)


def test_build_scheduler_follows_lr_multiplier():
    opt, sched = _scheduler(warmup_ratio=0.1, decay="cosine", min_lr_ratio=0.1)
    seen = []
    for _ in range(41):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * lr_multiplier(s, warmup_steps=4, max_steps=40, decay="cosine", power=0.5, min_lr_ratio=0.1)
                for s in range(41)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


def test_scheduler_state_dict_resumes_exactly():
    opt, sched = _scheduler(warmup_steps=5, decay="poly", power=2.0)
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    # A fresh scheduler built with a different schedule takes the saved one over entirely.
    opt2, sched2 = _scheduler(warmup_steps=1, decay="linear")
    sched2.load_state_dict(state)
    for _ in range(10):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
