"""The shard writer: samples laid out as tar bytes with numpy, a batch of samples at a time.

A shard is a plain (uncompressed) POSIX tar that stock ``webdataset.WebDataset`` reads: one member
per array, named ``<key>.<field>.npy`` / ``<key>.<field>.cls``, members of a sample adjacent.
Headers carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the bytes depend on
the content alone; they are the bytes stdlib tarfile writes for the same members (tested).  A shard
is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from data_prep.fsutil import remove_stale_temps, temp_path_for

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
MAX_NAME = 100  # bytes of a member name in a USTAR header

_NPY_HEADERS: dict[tuple[str, int], bytes] = {}


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The header ``np.save`` writes (format 1.0) for a 1-D array of ``length`` items, cached."""
    key = (dtype.str, length)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (length,)})
        header = buf.getvalue()
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
    return header


def npy_bytes(arr: np.ndarray) -> bytes:
    """The exact bytes ``np.save`` writes for a 1-D array (format 1.0), with the header cached."""
    return _npy_header(arr.dtype, arr.shape[0]) + arr.tobytes()


def npy_rows(data: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``npy_bytes(data[r, :lengths[r]])`` for every row r of a 2-D array, vectorized: a uint8 array
    [rows, width] whose row r starts with those bytes (zeros after them) and the byte sizes."""
    data = np.ascontiguousarray(data)
    rows, cols = data.shape
    lengths = np.asarray(lengths, dtype=np.int64)
    unique, inverse = np.unique(lengths, return_inverse=True)
    header_table, header_sizes = bytes_rows([_npy_header(data.dtype, int(n)) for n in unique.tolist()])
    item = data.dtype.itemsize
    width = cols * item
    head_sizes = header_sizes[inverse]
    out = np.zeros((rows, header_table.shape[1] + width), dtype=np.uint8)
    if (header_sizes == header_sizes[0]).all():  # always, short of shapes with very different digit counts
        head = int(header_sizes[0])
        out[:, :head] = header_table[inverse]
        body = data.view(np.uint8).reshape(rows, width)
        out[:, head:head + width] = np.where(np.arange(width) < (lengths * item)[:, None], body, 0)
    else:
        for r in range(rows):
            raw = npy_bytes(data[r, :lengths[r]])
            out[r, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out, head_sizes + lengths * item


def bytes_rows(values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as one zero-padded uint8 array [len(values), longest] and their sizes."""
    sizes = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    width = int(sizes.max()) if len(values) else 0
    if len(values) and (sizes == width).all():
        return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width).copy(), sizes
    out = np.zeros((len(values), width), dtype=np.uint8)
    for r, v in enumerate(values):
        out[r, :len(v)] = np.frombuffer(v, dtype=np.uint8)
    return out, sizes


def _ustar_template() -> bytearray:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o644, 0, 0, "", ""
    return bytearray(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))


_USTAR = _ustar_template()  # fixed metadata: mtime 0, uid/gid 0, mode 0644, no user names
# The checksum is the byte sum of the header with its own field as spaces: the fixed part once.
_FIXED_SUM = sum(_USTAR) - sum(_USTAR[0:100]) - sum(_USTAR[124:136]) - sum(_USTAR[148:156]) + 8 * ord(" ")


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile would write for a regular file with our fixed metadata
    (built from a template: tarfile's own code costs ~80 us a member)."""
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME or size >= 8 ** 11:
        raise ValueError(f"member {name!r} of {size} bytes does not fit a USTAR header")
    size_field = b"%011o\0" % size
    header = _USTAR.copy()
    header[0:len(raw)] = raw
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return bytes(header)


_DIGIT_SHIFTS = {n: 3 * np.arange(n - 1, -1, -1) for n in (6, 11)}


def _octal_rows(values: np.ndarray, digits: int) -> np.ndarray:
    """``b"%0{digits}o" % v`` for every value, as uint8 [len(values), digits]."""
    return (((values[:, None] >> _DIGIT_SHIFTS[digits]) & 7) + ord("0")).astype(np.uint8)


def _header_rows(key_arr: np.ndarray, ext: str, sizes: np.ndarray) -> np.ndarray:
    """``tar_header(f"{key}.{ext}", size)`` for every row, vectorized: uint8 [rows, 512]."""
    key_len = key_arr.shape[1]
    template = np.frombuffer(tar_header("k" * key_len + "." + ext, 0), dtype=np.uint8)
    headers = np.repeat(template[None, :], len(sizes), axis=0)
    headers[:, :key_len] = key_arr
    headers[:, 124:135] = _octal_rows(sizes, 11)
    headers[:, 148:156] = ord(" ")  # the checksum counts its own field as spaces
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = _octal_rows(checksum, 6)
    headers[:, 154] = 0
    return headers


def _layout(heads: list[np.ndarray], bodies: list[np.ndarray], member_blocks: list[int], rows) -> np.ndarray:
    """The tar blocks [samples, blocks, 512] of samples ``rows`` (indices, or a slice: all), which share
    ``member_blocks`` (blocks of each member: its header, then its data padded with zeros to whole blocks)."""
    n = heads[0].shape[0] if isinstance(rows, slice) else len(rows)
    group = np.zeros((n, sum(member_blocks) * BLOCK), dtype=np.uint8)
    at = 0
    for head, body, count in zip(heads, bodies, member_blocks):
        group[:, at:at + BLOCK] = head[rows]
        width = min(body.shape[1], (count - 1) * BLOCK)  # past a row's size a body is zeros
        group[:, at + BLOCK:at + BLOCK + width] = body[rows, :width]
        at += count * BLOCK
    return group.reshape(n, -1, BLOCK)


def _rows(members: list[tuple[str, np.ndarray, np.ndarray]], lo: int, hi: int) -> list:
    return [(ext, payload[lo:hi], sizes[lo:hi]) for ext, payload, sizes in members]


class ShardWriter:
    """Write one shard under a temp name; ``commit()`` renames it into place and returns its stats."""

    ROWS_AT_ONCE = 1024  # bounds the memory of a layout (~4 KiB a sample)

    def __init__(self, path: Path):
        self.path = Path(path)
        remove_stale_temps(self.path)
        self.tmp = temp_path_for(self.path)
        self._f = open(self.tmp, "wb", buffering=0)
        self._sha = hashlib.sha256()
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

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: ``fields`` maps extension (``input_ids.npy``) to bytes, written in that order."""
        self.add_rows([key], [(ext, *bytes_rows([data])) for ext, data in fields.items()])

    def add_rows(self, keys: list[str], members: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Samples ``keys``, the same members for each: per member, (extension, uint8 payloads
        [len(keys), width], zero past each row's size, as ``npy_rows`` / ``bytes_rows`` give them,
        byte sizes)."""
        encoded = [k.encode("utf-8") for k in keys]
        lo = 0
        while lo < len(keys):  # ROWS_AT_ONCE at most, of one key length (it grows past 999,999 samples)
            hi = min(len(keys), lo + self.ROWS_AT_ONCE)
            hi = next((r for r in range(lo, hi) if len(encoded[r]) != len(encoded[lo])), hi)
            self._write_rows(encoded[lo:hi], _rows(members, lo, hi))
            lo = hi

    def _write_rows(self, keys: list[bytes], members: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """``add_rows`` for keys of one length."""
        key_len = len(keys[0])
        if key_len + 1 + max(len(ext.encode("utf-8")) for ext, _, _ in members) > MAX_NAME:
            raise ValueError(f"member names of key {keys[0].decode()!r} do not fit a USTAR header ({MAX_NAME} bytes)")
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), key_len)
        heads, bodies, blocks = [], [], []
        for ext, payload, sizes in members:
            sizes = np.asarray(sizes, dtype=np.int64)
            if (sizes >= 8 ** 11).any():
                raise ValueError(f"a member {ext!r} of {int(sizes.max())} bytes does not fit a USTAR header")
            heads.append(_header_rows(key_arr, ext, sizes))
            bodies.append(payload)
            blocks.append(1 + -(-sizes // BLOCK))
        # A sample is a whole number of blocks.  Samples with the same blocks per member (few kinds)
        # are laid out together with slices, then their blocks moved into place.
        layout = np.stack(blocks, axis=1)  # [rows, members]
        sample_blocks = layout.sum(axis=1)
        first_block = np.cumsum(sample_blocks) - sample_blocks
        kinds, kind_of = np.unique(layout, axis=0, return_inverse=True)
        if len(kinds) == 1:  # the usual case: every sample has the same layout, so nothing moves
            out = _layout(heads, bodies, kinds[0].tolist(), slice(None))
        else:
            out = np.empty((int(sample_blocks.sum()), BLOCK), dtype=np.uint8)
            for kind, member_blocks in enumerate(kinds.tolist()):
                rows = np.flatnonzero(kind_of.reshape(-1) == kind)
                out[first_block[rows][:, None] + np.arange(sum(member_blocks))] = \
                    _layout(heads, bodies, member_blocks, rows)
        self.samples += len(keys)
        self._write_all(out)

    def commit(self) -> dict:
        tail = 2 * BLOCK  # end-of-archive marker, then zeros up to a whole record (as tarfile does)
        tail += (RECORD - (self.bytes + tail) % RECORD) % RECORD
        self._write_all(bytes(tail))
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest(), "samples": self.samples}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
