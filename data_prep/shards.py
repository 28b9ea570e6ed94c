"""Stage 7, shards: names, sample keys, the byte-deterministic tar writer, the manifest and readers.

A shard is a plain (uncompressed) POSIX tar that stock ``webdataset.WebDataset`` reads: one member
per array, named ``<key>.<field>.npy`` / ``<key>.<field>.cls``, members of a sample adjacent.
Headers carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the bytes depend
on the content alone.  A shard is written under a temporary name and renamed when complete.
docs/data-format.md describes every field.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.errors import PrepError
from data_prep.fsutil import remove_stale_temps, temp_path_for

FORMAT_NAME = "bertforge-wds"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SPLIT_CODES = {"train": 0, "val": 1}
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
SHARD_NAME = re.compile(r"^(train|val)-(\d{6,})\.tar$")
KEY = re.compile(r"^(train|val)-(\d{6,})-(\d{6,})$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, shard_index: int, position: int) -> str:
    return f"{split}-{shard_index:06d}-{position:06d}"


def parse_key(key: str) -> tuple[str, int, int]:
    m = KEY.match(os.path.basename(key))
    if not m:
        raise ValueError(f"not a data_prep sample key: {key!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


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


_ZEROS = bytes(BLOCK)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile would write for a regular file with our fixed metadata.

    Built from a template (tarfile's own code costs ~80 us a member, most of a shard's write time).
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        raise ValueError(f"member {name!r} of {size} bytes does not fit a USTAR header")
    size_field = b"%011o\0" % size
    header = _USTAR.copy()
    header[0:len(raw)] = raw
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return bytes(header)


class _HeaderTemplates:
    """Headers of members ``<key>.<ext>``: for a given key length, ext and size only the key's bytes
    (and so the checksum) change, so a header is two cached pieces around the key and checksum."""

    def __init__(self):
        self._cache: dict[tuple[int, str, int], tuple[bytes, bytes, int]] = {}

    def header(self, key: bytes, key_sum: int, ext: str, size: int) -> bytes:
        entry = self._cache.get((len(key), ext, size))
        if entry is None:
            filler = b"\1" * len(key)  # any bytes: the key replaces them
            full = tar_header(filler.decode() + "." + ext, size)
            base = sum(full) - sum(full[148:156]) + 8 * ord(" ") - sum(filler)
            entry = (full[len(key):148], full[156:], base)
            if len(self._cache) < 65536:
                self._cache[(len(key), ext, size)] = entry
        middle, tail, base = entry
        return b"".join((key, middle, b"%06o\0 " % (base + key_sum), tail))


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


class ShardWriter:
    """Write one shard under a temp name; ``commit()`` renames it into place and returns its stats.

    Samples are gathered in memory and written (and hashed) about a megabyte at a time: one
    system call per sample would cost more than building the sample.
    """

    FLUSH_BYTES = 1 << 20
    ROWS_AT_ONCE = 1024

    def __init__(self, path: Path):
        self.path = Path(path)
        remove_stale_temps(self.path)
        self.tmp = temp_path_for(self.path)
        self._f = open(self.tmp, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.bytes = 0
        self.samples = 0
        self._headers = _HeaderTemplates()

    def _write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        block = b"".join(self._pending)
        self._write_all(block)
        self._pending, self._pending_bytes = [], 0

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
        key_bytes = key.encode("utf-8")
        key_sum = sum(key_bytes)
        header = self._headers.header
        parts = self._pending
        added = 0
        for ext, data in fields.items():
            size = len(data)
            pad = -size % BLOCK
            parts.append(header(key_bytes, key_sum, ext, size))
            parts.append(data)
            if pad:
                parts.append(_ZEROS[:pad])
            added += BLOCK + size + pad
        self.samples += 1
        self._pending_bytes += added
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def add_rows(self, keys: list[str], members: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Many samples at once, the same bytes as ``add`` per sample, laid out with numpy instead of a
        Python loop over every member of every sample.  ``members``: per field, (extension, uint8
        payloads [len(keys), width] as ``npy_rows`` / ``bytes_rows`` give, byte sizes)."""
        if len(keys) > self.ROWS_AT_ONCE:  # bounds the memory of the layout below (~4 KiB a sample)
            for lo in range(0, len(keys), self.ROWS_AT_ONCE):
                hi = lo + self.ROWS_AT_ONCE
                self.add_rows(keys[lo:hi], [(ext, payload[lo:hi], sizes[lo:hi]) for ext, payload, sizes in members])
            return
        encoded = [k.encode("utf-8") for k in keys]
        if not encoded:
            return
        key_len = len(encoded[0])
        if any(len(k) != key_len for k in encoded) or key_len + 1 + max(len(e) for e, _, _ in members) > 100:
            for r, key in enumerate(keys):  # keys of different lengths: rare (a shard of over 1M samples)
                self.add(key, {ext: payload[r, :size].tobytes()
                               for ext, payload, size in ((e, p, int(z[r])) for e, p, z in members)})
            return
        key_arr = np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(keys), key_len)
        # Every member is a header block plus its data padded to whole blocks, so a sample is a whole
        # number of blocks.  Rows with the same block counts per member (few kinds) are laid out
        # together with slices, then their blocks moved into place.
        heads, bodies, blocks = [], [], []
        for ext, payload, sizes in members:
            sizes = np.asarray(sizes, dtype=np.int64)
            if (sizes >= 8 ** 11).any():
                raise ValueError(f"a member {ext!r} of {int(sizes.max())} bytes does not fit a USTAR header")
            heads.append(_header_rows(key_arr, ext, sizes))
            bodies.append(np.where(np.arange(payload.shape[1]) < sizes[:, None], payload, 0).astype(np.uint8))
            blocks.append(1 + -(-sizes // BLOCK))
        layout = np.stack(blocks, axis=1)  # [rows, members]: blocks of each member
        sample_blocks = layout.sum(axis=1)
        first_block = np.cumsum(sample_blocks) - sample_blocks
        kinds, kind_of = np.unique(layout, axis=0, return_inverse=True)
        kind_of = kind_of.reshape(-1)
        if len(kinds) == 1:  # the usual case: every row has the same layout, so no moving is needed
            out = self._layout_group(heads, bodies, kinds[0].tolist(), slice(None)).reshape(-1, BLOCK)
        else:
            out = np.empty((int(sample_blocks.sum()), BLOCK), dtype=np.uint8)
            for kind, member_blocks in enumerate(kinds.tolist()):
                rows = np.flatnonzero(kind_of == kind)
                group = self._layout_group(heads, bodies, member_blocks, rows)
                out[first_block[rows][:, None] + np.arange(sum(member_blocks))] = group.reshape(len(rows), -1, BLOCK)
        self.samples += len(keys)
        self._flush()  # what ``add`` gathered goes first; ``out`` is written as it is, not copied
        self._write_all(out)

    @staticmethod
    def _layout_group(heads, bodies, member_blocks: list[int], rows) -> np.ndarray:
        """Samples ``rows`` that share ``member_blocks`` (blocks per member), one per row of bytes."""
        n = heads[0].shape[0] if isinstance(rows, slice) else len(rows)
        group = np.zeros((n, sum(member_blocks) * BLOCK), dtype=np.uint8)
        at = 0
        for head, body, count in zip(heads, bodies, member_blocks):
            group[:, at:at + BLOCK] = head[rows]
            width = min(body.shape[1], (count - 1) * BLOCK)  # past a row's size a body is zeros
            group[:, at + BLOCK:at + BLOCK + width] = body[rows, :width]
            at += count * BLOCK
        return group

    def commit(self) -> dict:
        self._flush()
        tail = 2 * BLOCK  # end-of-archive marker, then zeros up to a whole record (as tarfile does)
        tail += (RECORD - (self.bytes + tail) % RECORD) % RECORD
        self._write(bytes(tail))
        self._flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest(), "samples": self.samples}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: raw bytes}) per sample of a shard, in file order (stdlib tarfile)."""
    current, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = os.path.basename(member.name).partition(".")
            if key != current:
                if current is not None:
                    yield current, fields
                current, fields = key, {}
            fields[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, fields


def decode_fields(fields: dict[str, bytes]) -> dict:
    """Raw member bytes -> numpy arrays (``.npy``) and ints (``.cls``)."""
    out = {}
    for ext, data in fields.items():
        name, _, kind = ext.rpartition(".")
        if kind == "npy":
            out[name] = np.load(io.BytesIO(data), allow_pickle=False)
        elif kind == "cls":
            out[name] = int(data)
        else:
            out[ext] = data
    return out


def read_manifest(out_dir) -> dict:
    """The manifest of a finished shard directory, with ``dir`` (its absolute path) added."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise PrepError(f"{out_dir}: no {MANIFEST}; expected a directory written by `python -m data_prep shards` "
                        "(an unfinished multi-node run needs `python -m data_prep merge` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PrepError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT_NAME:
        raise PrepError(f"{path}: format is {manifest.get('format')!r}; expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepError(f"{path}: format_version {manifest.get('format_version')} is not supported by this "
                        f"data_prep (it reads version {FORMAT_VERSION}); rebuild the shards")
    manifest["dir"] = str(Path(out_dir).resolve())
    return manifest


def split_info(manifest: dict, split: str) -> dict:
    """What a training loader needs about one split: shards (name, samples, ...) and sample format."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fmt = manifest["sample_format"]
    tok = manifest["tokenizer"]
    tok_dir = tok.get("dir")
    if tok_dir and manifest.get("dir"):
        tok_dir = str(Path(manifest["dir"]) / tok_dir)
    return {
        "shards": [s for s in manifest["shards"] if s["split"] == split],
        "seq_len": fmt["seq_len"],
        "max_predictions": fmt["max_predictions"],
        "dynamic": fmt["masking"] == "dynamic",
        "whole_word": fmt["whole_word_mask"],
        "mlm_probability": fmt["masked_lm_prob"],
        "objective": fmt["objective"],
        "has_sentence_labels": fmt["objective"] in ("nsp", "sop"),
        "sentence_label_key": fmt.get("sentence_label_key"),
        "token_dtype": fmt["token_dtype"],
        "vocab_size": tok["vocab_size"],
        "special_ids": dict(tok["special_ids"]),
        "tokenizer_hash": tok["sha256"],
        "tokenizer_dir": tok_dir,
        "fingerprint": manifest["fingerprint"],
        "seed": manifest["seed"],
    }


def iter_samples(out_dir, split: str = "train", limit: int | None = None) -> Iterator[dict]:
    """Decoded samples of a split in manifest order, each with ``__key__`` and ``__shard__``."""
    manifest = read_manifest(out_dir)
    n = 0
    for shard in split_info(manifest, split)["shards"]:
        for key, fields in iter_tar_samples(Path(out_dir) / shard["name"]):
            if limit is not None and n >= limit:
                return
            sample = decode_fields(fields)
            sample["__key__"], sample["__shard__"] = key, shard["name"]
            yield sample
            n += 1
