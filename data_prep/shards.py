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
from data_prep.fsutil import remove_stale_temps, sha256_stream, temp_path_for

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


def iter_tar_samples(source) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: raw bytes}) per sample of a shard, in file order (stdlib tarfile).
    ``source``: a path, or a binary file open at the shard's start (e.g. from ``open_shard``)."""
    current, fields = None, {}
    opened = tarfile.open(source, "r:") if isinstance(source, (str, os.PathLike)) else \
        tarfile.open(fileobj=source, mode="r:")
    with opened as tar:
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


def decode_fields(fields: dict[str, bytes], where: str = "sample") -> dict:
    """Raw member bytes -> numpy arrays (``.npy``) and ints (``.cls``); a member that does not decode
    raises PrepError naming ``where`` (e.g. "<shard>: sample <key>") and the member."""
    out = {}
    for ext, data in fields.items():
        name, _, kind = ext.rpartition(".")
        try:
            if kind == "npy":
                out[name] = np.load(io.BytesIO(data), allow_pickle=False)
            elif kind == "cls":
                out[name] = int(data)
            else:
                out[ext] = data
        except (ValueError, EOFError, OSError) as err:
            raise PrepError(f"{where}: {ext}: cannot decode ({err})") from None
    return out


def shard_path(out_dir, name: str) -> Path:
    """Where shard ``name`` of a shard directory is: names are plain shard file names, and a shard that
    is a symlink must not lead outside the directory (a manifest is input like any other)."""
    if not isinstance(name, str) or not SHARD_NAME.match(name):
        raise PrepError(f"{name!r} is not a plain shard file name (like {shard_name('train', 0)})")
    path = Path(out_dir) / name
    real, real_dir = Path(os.path.realpath(path)), Path(os.path.realpath(out_dir))
    if real.parent != real_dir and path.is_symlink():
        raise PrepError(f"{path}: a symlink to {real}, outside {real_dir}")
    return path


def shard_file_problem(f, entry: dict) -> str | None:
    """What is wrong with an open shard file against its manifest entry (size, then sha256), or None.
    One streaming pass over the file, whose position it leaves at the end."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size != entry["bytes"]:
        return f"{size} bytes, manifest says {entry['bytes']} (truncated or replaced?)"
    f.seek(0)
    digest = sha256_stream(f)
    if digest != entry["sha256"]:
        return (f"sha256 differs from the manifest (file {digest[:16]}..., "
                f"manifest {entry['sha256'][:16]}...: corrupted)")
    return None


def open_shard(out_dir, entry: dict):
    """A shard opened for reading (binary, at its start) once its size and sha256 match its manifest
    entry; PrepError naming the shard otherwise.  The check reads the whole file once."""
    path = shard_path(out_dir, entry["name"])
    try:
        f = open(path, "rb")
    except OSError as err:
        raise PrepError(f"{path}: cannot open shard ({err.strerror}); run `python -m data_prep verify {out_dir}`") \
            from None
    try:
        problem = shard_file_problem(f, entry)
    except OSError as err:
        problem = f"cannot read shard ({err.strerror})"
    if problem:
        f.close()
        raise PrepError(f"{path}: {problem}; rebuild the shards or run `python -m data_prep verify {out_dir}`")
    f.seek(0)
    return f


def read_manifest(out_dir) -> dict:
    """The manifest of a finished shard directory, with ``dir`` (its absolute path) added.  Its fields
    are checked (``manifest_problems``): a missing key or bad value is one PrepError naming it."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise PrepError(f"{out_dir}: no {MANIFEST}; expected a directory written by `python -m data_prep shards` "
                        "(an unfinished multi-node run needs `python -m data_prep merge` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise PrepError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PrepError(f"{path}: format is {found!r}; expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepError(f"{path}: format_version {manifest.get('format_version')} is not supported by this "
                        f"data_prep (it reads version {FORMAT_VERSION}); rebuild the shards")
    problems = manifest_problems(manifest, out_dir)
    if problems:
        shown = "; ".join(problems[:MAX_SHOWN]) + (f"; and {len(problems) - MAX_SHOWN} more" if
                                                    len(problems) > MAX_SHOWN else "")
        raise PrepError(f"{path}: {shown}" if len(problems) == 1 else f"{path}: {len(problems)} problems: {shown}")
    manifest["dir"] = str(Path(out_dir).resolve())
    return manifest


# --------------------------------------------------------------------------------------------
# Manifest checks: every key a reader uses is present, of its type, and makes sense
# --------------------------------------------------------------------------------------------
MAX_SHOWN = 10  # problems named in one error
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a dict", list: "a list",
          type(None): "null"}
SENTENCE_LABEL_KEYS = {"nsp": "nsp_label", "sop": "sop_label"}


def sample_fields(objective: str, masking: str, whole_word_mask: bool) -> list[str]:
    """Member extensions of every sample, in write order (docs/data-format.md, "Samples")."""
    out = ["input_ids.npy"]
    if masking == "dynamic" and whole_word_mask:
        out.append("word_starts.npy")
    if masking == "static":
        out += ["masked_lm_positions.npy", "masked_lm_ids.npy"]
    if objective in SENTENCE_LABEL_KEYS:
        out.append(f"{SENTENCE_LABEL_KEYS[objective]}.cls")
    return out


def _typed(problems: list[str], parent: dict, key: str, name: str, kind: type):
    """``parent[key]`` when present and of ``kind`` (float: any number), else None and a problem."""
    if key not in parent:
        problems.append(f"{name}: missing")
        return None
    value = parent[key]
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool):
        problems.append(f"{name}: got {_KINDS.get(type(value), type(value).__name__)}, expected {_KINDS[kind]}")
        return None
    return value


def _int_in(problems: list[str], parent: dict, key: str, name: str, lo: int, hi: int | None = None):
    value = _typed(problems, parent, key, name, int)
    if value is not None and not (lo <= value and (hi is None or value <= hi)):
        problems.append(f"{name}: got {value}, expected an integer " + (f"in [{lo}, {hi}]" if hi is not None
                                                                         else f">= {lo}"))
        return None
    return value


def _tokenizer_problems(problems: list[str], manifest: dict) -> int | None:
    """Problems of the ``tokenizer`` section; its vocab_size when that is valid."""
    tok = _typed(problems, manifest, "tokenizer", "tokenizer", dict)
    if tok is None:
        return None
    _typed(problems, tok, "sha256", "tokenizer.sha256", str)
    tok_dir = _typed(problems, tok, "dir", "tokenizer.dir", str)
    if tok_dir is not None and (tok_dir in ("", ".", "..") or "/" in tok_dir or "\\" in tok_dir):
        problems.append(f"tokenizer.dir: {tok_dir!r} is not a plain directory name (expected 'tokenizer')")
    vocab_size = _int_in(problems, tok, "vocab_size", "tokenizer.vocab_size", 16, 1 << 31)
    special = _typed(problems, tok, "special_ids", "tokenizer.special_ids", dict)
    for role in ("pad", "unk", "cls", "sep", "mask") if special is not None else ():
        value = _int_in(problems, special, role, f"tokenizer.special_ids.{role}", 0)
        if value is not None and vocab_size is not None and value >= vocab_size:
            problems.append(f"tokenizer.special_ids.{role}: {value} is not below tokenizer.vocab_size ({vocab_size})")
    return vocab_size


def _format_problems(problems: list[str], manifest: dict, vocab_size: int | None) -> None:
    from data_prep.config import MASKING_MODES, OBJECTIVES, RANGES

    fmt = _typed(problems, manifest, "sample_format", "sample_format", dict)
    if fmt is None:
        return
    where = "sample_format."
    objective = _typed(problems, fmt, "objective", where + "objective", str)
    masking = _typed(problems, fmt, "masking", where + "masking", str)
    for key, value, allowed in (("objective", objective, OBJECTIVES), ("masking", masking, MASKING_MODES)):
        if value is not None and value not in allowed:
            problems.append(f"{where}{key}: got {value!r}, expected one of {', '.join(allowed)}")
    whole_word = _typed(problems, fmt, "whole_word_mask", where + "whole_word_mask", bool)
    seq_len = _int_in(problems, fmt, "seq_len", where + "seq_len", *RANGES["shards.seq_len"])
    _int_in(problems, fmt, "max_predictions", where + "max_predictions", 1, seq_len or RANGES["shards.seq_len"][1])
    prob = _typed(problems, fmt, "masked_lm_prob", where + "masked_lm_prob", float)
    if prob is not None and not 0 < prob < 1:
        problems.append(f"{where}masked_lm_prob: got {prob}, expected a number in (0, 1)")
    dtype = _typed(problems, fmt, "token_dtype", where + "token_dtype", str)
    if dtype is not None and dtype not in ("uint16", "int32"):
        problems.append(f"{where}token_dtype: got {dtype!r}, expected uint16 or int32")
    elif dtype == "uint16" and vocab_size is not None and vocab_size > 1 << 16:
        problems.append(f"{where}token_dtype: uint16 cannot hold the ids of a vocabulary of {vocab_size}")
    if objective in OBJECTIVES and masking in MASKING_MODES and whole_word is not None:
        _members_problems(problems, fmt, objective, masking, whole_word)


def _members_problems(problems: list[str], fmt: dict, objective: str, masking: str, whole_word: bool) -> None:
    """The sentence label key and the sample fields must be those the objective and masking give."""
    label_key = SENTENCE_LABEL_KEYS.get(objective)
    if fmt.get("sentence_label_key") != label_key:
        problems.append(f"sample_format.sentence_label_key: {fmt.get('sentence_label_key')!r} does not fit "
                        f"objective {objective!r} (expected {label_key!r})")
    expected = sample_fields(objective, masking, whole_word)
    if fmt.get("fields") != expected:
        problems.append(f"sample_format.fields: {fmt.get('fields')} do not fit objective {objective!r}, masking "
                        f"{masking!r}, whole_word_mask {whole_word} (expected {expected})")


def _shard_problems(problems: list[str], manifest: dict, out_dir) -> None:
    shards = _typed(problems, manifest, "shards", "shards", list)
    splits = _typed(problems, manifest, "splits", "splits", dict)
    for split in SPLITS if splits is not None else ():
        _typed(problems, splits, split, f"splits.{split}", dict)
    seen = set()
    for i, entry in enumerate(shards or ()):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: got {_KINDS.get(type(entry), type(entry).__name__)}, expected a dict")
            continue
        name = _typed(problems, entry, "name", where + ".name", str)
        split = _typed(problems, entry, "split", where + ".split", str)
        if split is not None and split not in SPLITS:
            problems.append(f"{where}.split: got {split!r}, expected one of {', '.join(SPLITS)}")
        index = _int_in(problems, entry, "index", where + ".index", 0)
        for key in ("samples", "tokens", "bytes"):
            _int_in(problems, entry, key, f"{where}.{key}", 0)
        digest = _typed(problems, entry, "sha256", where + ".sha256", str)
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"{where}.sha256: {digest!r} is not a sha256 hex digest")
        if name is None:
            continue
        try:
            shard_path(out_dir, name)
        except PrepError as err:
            problems.append(f"{where}.name: {err}")
            continue
        if split in SPLITS and index is not None and name != shard_name(split, index):
            problems.append(f"{where}.name: {name!r} does not fit its split and index "
                            f"(expected {shard_name(split, index)!r})")
        elif name in seen:
            problems.append(f"{where}.name: {name!r} is listed twice")
        seen.add(name)


def manifest_problems(manifest: dict, out_dir) -> list[str]:
    """Every problem of a manifest's fields, each naming its key: what a reader needs is present, of its
    type and consistent (special ids below the vocabulary size, fields that fit the objective and the
    masking, seq_len and max_predictions in range, shard names confined to ``out_dir``)."""
    problems: list[str] = []
    _typed(problems, manifest, "fingerprint", "fingerprint", str)
    _int_in(problems, manifest, "seed", "seed", 0)
    _format_problems(problems, manifest, _tokenizer_problems(problems, manifest))
    _shard_problems(problems, manifest, out_dir)
    return problems


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
        "has_sentence_labels": fmt["objective"] in SENTENCE_LABEL_KEYS,
        "sentence_label_key": fmt.get("sentence_label_key"),
        "token_dtype": fmt["token_dtype"],
        "vocab_size": tok["vocab_size"],
        "special_ids": dict(tok["special_ids"]),
        "tokenizer_hash": tok["sha256"],
        "tokenizer_dir": tok_dir,
        "fingerprint": manifest["fingerprint"],
        "seed": manifest["seed"],
    }


def iter_shard(out_dir, entry: dict) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, raw members) per sample of a shard checked by ``open_shard``; read to its end, a shard
    that holds another number of samples than its manifest entry raises PrepError naming it."""
    path = shard_path(out_dir, entry["name"])
    count = 0
    with open_shard(out_dir, entry) as f:
        try:
            for count, sample in enumerate(iter_tar_samples(f), 1):
                yield sample
        except tarfile.TarError as err:
            raise PrepError(f"{path}: not a readable tar ({err}); run `python -m data_prep verify {out_dir}`") from None
    if count != entry["samples"]:
        raise PrepError(f"{path}: holds {count} samples but the manifest says {entry['samples']}; "
                        f"run `python -m data_prep verify {out_dir}`")


def iter_split_samples(out_dir, manifest: dict, split: str,
                       limit: int | None = None) -> Iterator[tuple[str, str, str, dict]]:
    """(where, shard name, key, decoded sample) in manifest order, at most ``limit``; every shard is
    checked against the manifest first (``iter_shard``); ``where`` names shard and sample for errors."""
    n = 0
    for shard in split_info(manifest, split)["shards"]:
        path = shard_path(out_dir, shard["name"])
        for key, fields in iter_shard(out_dir, shard):
            if limit is not None and n >= limit:
                return
            where = f"{path}: sample {key}"
            yield where, shard["name"], key, decode_fields(fields, where)
            n += 1


def iter_samples(out_dir, split: str = "train", limit: int | None = None) -> Iterator[dict]:
    """Decoded samples of a split in manifest order, each with ``__key__`` and ``__shard__``; every
    shard is checked against the manifest first (``open_shard``)."""
    for _, name, key, sample in iter_split_samples(out_dir, read_manifest(out_dir), split, limit):
        sample["__key__"], sample["__shard__"] = key, name
        yield sample
