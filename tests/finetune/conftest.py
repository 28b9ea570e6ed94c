"""Fixtures of every fine-tuning test."""
from __future__ import annotations

import signal

import pytest

from pretrain.signals import STOP_SIGNALS


@pytest.fixture(autouse=True)
def own_signal_handlers():
    """A command run in this process installs its stop handlers here (pretrain.signals): the test process's
    own are put back after each test, so a SIGTERM to pytest still ends it."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
