"""One training run per run directory: an exclusive flock on ``RUN_DIR/train.lock``.

A second `pretrain train` in the same directory (a mistake, or a job started while the previous
one still runs) would interleave its metrics.jsonl rows and checkpoints with the first one's.
The kernel drops the lock when its holder ends, however it ends; the file stays behind, naming
the last holder's pid, and does not block the next run.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
# Filesystems without flock support (some NFS or FUSE mounts) answer these: train unprotected.
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunDirError(RuntimeError):
    pass


class RunDirInUse(RunDirError):
    def __init__(self, run_dir: str, pid: int):
        who = f"pid {pid}" if pid > 0 else "another process (its pid is not written yet)"
        super().__init__(f"{run_dir} is in use by {who}, which holds {os.path.join(run_dir, LOCK_FILE)}: "
                         f"wait for that run to end, or choose another logging.run_dir")
        self.pid = pid


def lock_run_dir(run_dir: str) -> Optional[int]:
    """Create ``run_dir`` and lock it for this process; return the lock's file descriptor (the
    lock lives until it is closed or the process ends), or None where the filesystem cannot lock.
    Raises RunDirInUse, naming the holder's pid, when another process holds the lock, and
    RunDirError when the lock file cannot be created."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"{path}: cannot create the run directory's lock file ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirInUse(run_dir, int(holder) if holder.isdigit() else 0) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in UNSUPPORTED:
            raise
        log.warning("%s: the filesystem cannot lock (%s): nothing stops a second run from using %s at the "
                    "same time", path, err.strerror, run_dir)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
