"""The shard writer: a shard's samples as columns, one zstd-compressed ``.npy`` member per column per chunk.

A shard is a plain (uncompressed) POSIX tar that stock ``webdataset.WebDataset`` reads: per chunk of
``chunk_samples`` consecutive samples, one member ``<chunk key>.<column>.npy.zst`` per column, in
column order (format.py).  Headers carry fixed metadata (mtime 0, uid/gid 0, no user names, mode
0644) and the npy headers and zstd frames depend on the content alone, so a shard's bytes do too.
A shard is written under a temporary name, hashed while written, fsynced and renamed when complete.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import zstandard

from data_prep.fsutil import remove_stale_temps, temp_path_for
from data_prep.shards.format import COUNT_COLUMN, member_name, sample_key

BLOCK = tarfile.BLOCKSIZE


def npy_bytes(arr: np.ndarray) -> bytes:
    """The exact bytes ``np.save(allow_pickle=False)`` writes for a 1-D array (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                               "fortran_order": False, "shape": (len(arr),)})
    return buf.getvalue() + np.ascontiguousarray(arr).tobytes()


def tar_header(name: str, size: int) -> bytes:
    """The USTAR header of a regular file with fixed metadata (mtime 0, uid/gid 0, mode 0644)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def split_batch(batch: dict[str, np.ndarray], k: int) -> tuple[dict, dict]:
    """A batch of columns cut after its first ``k`` samples (ragged columns where their counts say)."""
    cut = {name: k if name not in COUNT_COLUMN else int(batch[COUNT_COLUMN[name]][:k].sum()) for name in batch}
    return {n: a[:cut[n]] for n, a in batch.items()}, {n: a[cut[n]:] for n, a in batch.items()}


class ShardWriter:
    """Write shard ``index`` of ``split`` under a temp name; ``add`` batches of columns, then ``commit()``
    renames it into place and returns its stats (bytes, sha256, samples)."""

    def __init__(self, path: Path, split: str, index: int, columns: dict[str, str], chunk_samples: int, level: int):
        self.path = Path(path)
        self.split, self.index = split, index
        self.columns = dict(columns)  # name -> dtype, in write order
        self.chunk_samples = chunk_samples
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)
        remove_stale_temps(self.path)
        self.tmp = temp_path_for(self.path)
        self._f = open(self.tmp, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_samples = 0
        self.bytes = 0
        self.samples = 0

    def _write_all(self, data) -> None:
        """Write and hash a bytes-like object (an unbuffered write may take only part of it)."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._f.write(view[done:])
        self._sha.update(view)
        self.bytes += len(view)

    def add(self, batch: dict[str, np.ndarray], samples: int) -> None:
        """``samples`` consecutive samples: per column (all of them), a 1-D array, one item per sample
        for a count or label column, the items of every sample end to end for a ragged one."""
        if list(batch) != list(self.columns):
            raise ValueError(f"columns {list(batch)}, expected {list(self.columns)}")
        while samples:
            take = min(samples, self.chunk_samples - self._pending_samples)
            head, batch = split_batch(batch, take) if take < samples else (batch, {})
            self._pending.append(head)
            self._pending_samples += take
            samples -= take
            if self._pending_samples == self.chunk_samples:
                self._flush()

    def _flush(self) -> None:
        key = sample_key(self.split, self.index, self.samples)
        for name, dtype in self.columns.items():
            column = np.concatenate([part[name] for part in self._pending]).astype(dtype, copy=False)
            data = self._zstd.compress(npy_bytes(column))
            self._write_all(tar_header(member_name(key, name), len(data)))
            self._write_all(data + bytes(-len(data) % BLOCK))
        self.samples += self._pending_samples
        self._pending, self._pending_samples = [], 0

    def commit(self) -> dict:
        if self._pending_samples:
            self._flush()
        self._write_all(bytes(2 * BLOCK))  # end-of-archive marker
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest(), "samples": self.samples}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
