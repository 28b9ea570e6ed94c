"""Atomic file writes and hashing: a reader never sees a half-written output file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TMP_PREFIX = ".tmp-"


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


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temp name, then rename.  ``durable`` fsyncs first (skip it only for files whose
    loss after a power cut is harmless, e.g. resume records that merely cause a rebuild)."""
    path = Path(path)
    tmp = temp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
