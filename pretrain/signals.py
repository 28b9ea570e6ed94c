"""Stop requests: SIGTERM / SIGUSR1 set a flag that the training loop checks after each step.

Installed by the entry point before anything heavy is imported, so a signal that arrives while
torch and DeepSpeed start up is remembered (the loop then checkpoints after its first step)
instead of killing the process with nothing saved.  No torch import here on purpose.
"""
from __future__ import annotations

import signal
from typing import Optional


class StopSignal:
    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum
