"""Helper processes that must not outlive their main process: data_prep's pool workers and the
training loader's workers (pretrain imports this; it imports nothing of ours)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

_parent_pid: int | None = None  # the parent named to die_with_parent


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent ends, however the parent ends
    (kill -9 included).  Exits at once when ``parent_pid`` is already gone (it died before the
    request took effect)."""
    global _parent_pid
    _parent_pid = parent_pid
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if not parent_alive():
        os._exit(1)


def parent_alive() -> bool:
    """False in a process whose parent named to die_with_parent is gone (it is then a child of init or
    a subreaper); True where die_with_parent was not called.  The fallback where PR_SET_PDEATHSIG
    does not exist (not Linux): check it before an act that must not outlive the parent."""
    return _parent_pid is None or os.getppid() == _parent_pid
