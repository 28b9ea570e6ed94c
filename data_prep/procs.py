"""Helper processes that must not outlive their main process: data_prep's pool workers and the
training loader's workers (pretrain imports this; it imports nothing of ours)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent ends, however the parent ends
    (kill -9 included).  Exits at once when ``parent_pid`` is already gone (it died before the
    request took effect)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(1)
