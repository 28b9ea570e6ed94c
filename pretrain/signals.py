"""Stop requests: SIGTERM / SIGUSR1 / SIGINT set a flag that the training loop checks after each step.

Installed by the entry point before anything heavy is imported, so a signal that arrives while
torch and DeepSpeed start up is remembered (the loop then checkpoints after its first step)
instead of killing the process with nothing saved.  The first Ctrl-C (SIGINT) asks for the same
stop; it also restores SIGINT's default action, so a second Ctrl-C ends the process at once,
without a checkpoint, even while it waits inside a collective.  No torch import here on purpose.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    def __init__(self):
        self.received: Optional[int] = None
        self.announce = True          # print the Ctrl-C notice (the entry point keeps it to rank 0)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self.announce:     # os.write: print() could be re-entered in the middle of a print
                os.write(2, b"\ninterrupted: checkpointing after this step (Ctrl-C again to stop at once, "
                            b"without one)\n")


def ignore_stop_signals() -> None:
    """For helper processes (data loader workers): leave the stop signals to the main process.

    A SIGTERM or Ctrl-C sent to the whole process group (timeout, scancel, SLURM's time limit, a
    terminal) reaches them as well; ended by it, they would take the main process down before
    it could checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent ends, however the parent ends
    (kill -9 included).  Exits at once when ``parent_pid`` is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:      # the parent died before the request took effect
        os._exit(0)
