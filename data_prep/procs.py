"""Helper processes that must not outlive their main process: data_prep's pool workers and the
training loader's workers (pretrain imports this; it imports nothing of ours)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "BERTFORGE_PARENT_PID"
"""Set by a process for a command it starts that must not outlive it (a downstream suite during
pretraining): the command calls die_with_parent_from_env first."""

_parent_pid: int | None = None  # the parent named to die_with_parent


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send ``signum`` (SIGKILL: end at once) to this process when its parent ends,
    however the parent ends (kill -9 included).  Exits at once when ``parent_pid`` is already gone (it
    died before the request took effect)."""
    global _parent_pid
    _parent_pid = parent_pid
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))
    if not parent_alive():
        os._exit(1)


def die_with_parent_from_env() -> None:
    """die_with_parent(PARENT_PID_ENV's pid, SIGTERM) when the variable is set: a stop request, so that a
    command that checkpoints on SIGTERM does so before it ends."""
    pid = os.environ.get(PARENT_PID_ENV)
    if pid:
        die_with_parent(int(pid), signal.SIGTERM)


def parent_alive() -> bool:
    """False in a process whose parent named to die_with_parent is gone (it is then a child of init or
    a subreaper); True where die_with_parent was not called.  The fallback where PR_SET_PDEATHSIG
    does not exist (not Linux): check it before an act that must not outlive the parent."""
    return _parent_pid is None or os.getppid() == _parent_pid
