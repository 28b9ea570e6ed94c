"""Atomic file writes, hashing and the output directory's lock: a reader never sees a half-written
output file, and two runs never write one directory at once."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

from data_prep.errors import DirInUse, write_error

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".data_prep.lock"
# The names temp_path_for gives: TMP_PREFIX, the output's name, "." and the writer's pid.
TEMP_NAME = re.compile(rf"^{re.escape(TMP_PREFIX)}.+\.\d+$")


def temp_path_for(path: Path) -> Path:
    # Hidden, per-process name in the same directory, so os.replace is a same-filesystem rename
    # and no glob for finished outputs (``*.tar``, ``*.json``) ever matches it.
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def remove_stale_temps(path: Path) -> None:
    """Remove temp files left for ``path`` by a killed run (only this output's, never others')."""
    path = Path(path)
    for stale in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        stale.unlink(missing_ok=True)


def remove_temps(directory: Path) -> None:
    """Remove every temp file or directory in ``directory`` (left by killed runs); only while holding
    its lock exclusively, so that no other run of ours is writing one."""
    for stale in Path(directory).glob(f"{TMP_PREFIX}*"):
        if not TEMP_NAME.match(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.is_file():
            stale.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temp name, then rename.  ``durable`` fsyncs first (skip it only for files whose
    loss after a power cut is harmless, e.g. resume records that merely cause a rebuild).  On
    failure the temp is removed and a PrepError names the file (``writing PATH: reason``)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def atomic_write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", durable)


def read_json_or_none(path: Path):
    """A JSON file's content, or None when it is missing or damaged (e.g. cut by a crash)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """The sha256 of an open binary file from its current position to its end."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Filesystems without flock support (some NFS or FUSE mounts) answer these.
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def lock_dir(directory: Path, name: str = LOCK_FILE, shared: bool = False) -> int | None:
    """Take a non-blocking flock on ``directory/name`` (created, with the directory) and write this
    process's pid and host in it; return its descriptor (the lock lasts until the descriptor is
    closed or the process ends, however it ends), or None where the filesystem cannot lock.
    DirInUse names the holder when another process holds it (exclusively, or at all for an
    exclusive lock); a lock file that cannot be created is a PrepError naming it."""
    path = Path(directory) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, holder = _holder(fd)
        os.close(fd)
        raise DirInUse(f"{directory} is in use by {holder}", pid) from None
    except OSError as err:
        os.close(fd)
        if err.errno in LOCKS_UNSUPPORTED:
            return None
        raise write_error(path, err) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def locked_dir(directory: Path, name: str = LOCK_FILE, shared: bool = False) -> Iterator[None]:
    """Hold ``lock_dir(directory, name, shared)`` for the block (unprotected, with a warning, where
    the filesystem cannot lock)."""
    fd = lock_dir(directory, name, shared)
    if fd is None:
        print(f"warning: {Path(directory) / name}: the filesystem cannot lock: nothing stops a second run "
              f"from writing {directory} at the same time", file=sys.stderr)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _holder(fd: int) -> tuple[int, str]:
    """(pid or 0, 'pid N' and its host when it is another one) from a lock file's content."""
    pid, _, host = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
    if not pid.isdigit():
        return 0, "another process"
    return int(pid), f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
