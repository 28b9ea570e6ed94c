"""Stop requests: SIGTERM / SIGUSR1 / SIGINT set a flag that the training loop checks after each step.

Installed by the entry point before anything heavy is imported, so a signal that arrives while
torch and DeepSpeed start up is remembered (the loop then checkpoints after its first step)
instead of killing the process with nothing saved.  The first Ctrl-C (SIGINT) asks for the same
stop; it also restores SIGINT's default action, so a second Ctrl-C ends the process at once,
without a checkpoint, even while it waits inside a collective.  No torch import here on purpose.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
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


def leave_stop_signals_to(parent_pid: int) -> None:
    """For helper processes (data loader workers), started with ``stop_signals_blocked``: leave
    the stop signals to the main process ``parent_pid``.

    A SIGTERM or Ctrl-C sent to the whole process group (timeout, scancel, SLURM's time limit, a
    terminal) reaches the helpers as well; ended by it, they would take the main process down
    before it could checkpoint.  SIGINT and SIGUSR1 are ignored.  SIGTERM stays blocked and a
    thread takes it: from the parent (multiprocessing's terminate(), which the DataLoader and the
    interpreter's exit use on a helper that does not stop) it ends the process at once, from
    anyone else it is dropped.  A stop signal that came before this call is dropped too."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGUSR1))
    threading.Thread(target=_end_on_sigterm_from, args=(parent_pid,), name="sigterm-from-parent",
                     daemon=True).start()


def _end_on_sigterm_from(parent_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
            os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold the stop signals back (they wait, pending) while helper processes are forked: a
    child inherits the mask, so one that arrives before the child calls ``leave_stop_signals_to``
    cannot end it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
