"""Reading shards: a whole shard (bytes already checked against its manifest entry) parsed in memory,
its columns decompressed, checked against each other and the manifest, and served by sample.

``decode_shard`` is what every reader uses (pretrain's loader, ``verify``, ``stats``, ``inspect``,
``iter_split_samples``); ``wds_samples`` turns the chunks stock ``webdataset.WebDataset`` yields into
samples (docs/data-format.md, "Stock WebDataset").
"""
from __future__ import annotations

import io
from typing import Iterable, Iterator

import numpy as np
import zstandard

from data_prep.errors import PrepError
from data_prep.shards.format import (COUNT_COLUMN, COUNT_COLUMNS, KEY, MEMBER_SUFFIX, SENTENCE_LABEL_KEYS,
                                     member_name, sample_key)
from data_prep.shards.schema import split_info

BLOCK = 512
MAX_COLUMN_BYTES = 1 << 30  # a column that says it is larger is refused before it is allocated
NPY_HEADER_MAX = 4096       # room for an npy header in the size bound of a column
LABEL_COLUMNS = tuple(SENTENCE_LABEL_KEYS.values())


def tar_members(data, where: str) -> list[tuple[str, memoryview]]:
    """(name, data) of the regular-file members of an in-memory USTAR tar, in file order: one pass
    over the headers; PrepError naming ``where`` for a damaged or truncated tar or another member type."""
    view = memoryview(data)
    out, at = [], 0
    while at + BLOCK <= len(view):
        header = bytes(view[at:at + BLOCK])
        if header == bytes(BLOCK):
            return out
        try:
            stored = int(header[148:156].split(b"\0")[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
            name = header[0:100].split(b"\0")[0].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            stored, size, name = -1, 0, ""
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise PrepError(f"{where}: not a readable tar (bad header checksum at byte {at})")
        if header[156:157] not in (b"0", b"\0") or header[345:500].strip(b"\0"):
            raise PrepError(f"{where}: member {name!r} is not a plain file of a data_prep shard")
        if at + BLOCK + size > len(view):
            raise PrepError(f"{where}: truncated tar (member {name!r} ends past the end of the file)")
        out.append((name, view[at + BLOCK:at + BLOCK + size]))
        at += BLOCK + size + (-size % BLOCK)
    raise PrepError(f"{where}: truncated tar (no end-of-archive marker)")


def decode_column(data, where: str, max_bytes: int = MAX_COLUMN_BYTES, dtype: str | None = None) -> np.ndarray:
    """A 1-D array from a zstd frame of an ``.npy`` file (read-only, a view of the decompressed bytes).
    A frame whose declared size is unknown or above ``max_bytes``, bad zstd, a bad npy header, another
    ``dtype`` or shape: PrepError naming ``where``."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise PrepError(f"{where}: not a zstd frame ({err})") from None
    if size < 0 or size > min(max_bytes, MAX_COLUMN_BYTES):
        said = "no content size" if size < 0 else f"a content size of {size:,} bytes"
        raise PrepError(f"{where}: the zstd frame declares {said}; expected at most {min(max_bytes, MAX_COLUMN_BYTES):,}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as err:
        raise PrepError(f"{where}: cannot decompress ({err})") from None
    if len(raw) != size:
        raise PrepError(f"{where}: decompressed to {len(raw)} bytes, its frame declares {size}")
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in header:
            raise ValueError(f"npy format version {version}")
        shape, _, found = header[version](f)
    except (ValueError, EOFError) as err:
        raise PrepError(f"{where}: not an .npy array ({err})") from None
    if found.hasobject or len(shape) != 1 or (dtype is not None and found != np.dtype(dtype)):
        raise PrepError(f"{where}: a {found} array of shape {shape}, expected 1-D {dtype or 'numbers'}")
    if len(raw) - f.tell() != shape[0] * found.itemsize:
        raise PrepError(f"{where}: {len(raw) - f.tell()} bytes of data for {shape[0]} items of {found}")
    return np.frombuffer(raw, dtype=found, offset=f.tell())


class DecodedShard:
    """Consecutive samples (a whole shard, or a chunk of one) as numpy columns, served by sample.

    ``sample(i)`` gives field name -> value: ``input_ids`` and, per format, ``word_starts``,
    ``masked_lm_positions``, ``masked_lm_ids`` (1-D read-only views into the columns) and
    ``nsp_label`` / ``sop_label`` (int).  ``columns`` holds the stored columns themselves; ``nbytes``
    counts the memory held: the columns and the samples' offsets into them (numpy arrays, 8 bytes a
    sample per count column)."""

    def __init__(self, name: str, split: str, index: int, columns: dict[str, np.ndarray], first: int = 0):
        self.name, self.split, self.index, self.first = name, split, index, first
        self.columns = columns
        self._count = len(columns["lengths"])
        self._offsets = {c: np.concatenate([[0], np.cumsum(columns[c], dtype=np.int64)])
                         for c in COUNT_COLUMNS if c in columns}
        self._ragged = [(c, self._offsets[COUNT_COLUMN[c]]) for c in columns if c in COUNT_COLUMN]
        self._labels = [(c, columns[c]) for c in LABEL_COLUMNS if c in columns]
        self.nbytes = sum(a.nbytes for a in columns.values()) + sum(a.nbytes for a in self._offsets.values())

    def __len__(self) -> int:
        return self._count

    def sample(self, i: int) -> dict:
        if not 0 <= i < self._count:
            raise IndexError(f"{self.name}: sample {i} of {self._count}")
        out = {c: self.columns[c][offsets[i]:offsets[i + 1]] for c, offsets in self._ragged}
        out.update((c, int(labels[i])) for c, labels in self._labels)
        return out

    def key(self, i: int) -> str:
        return sample_key(self.split, self.index, self.first + i)


def _counts_problem(columns: dict[str, np.ndarray], samples: int) -> str | None:
    """Why columns do not hold ``samples`` samples (one item each, or their counts' sum), or None."""
    for name, column in columns.items():
        expected = int(columns[COUNT_COLUMN[name]].sum(dtype=np.int64)) if name in COUNT_COLUMN else samples
        if len(column) != expected:
            what = f"the sum of {COUNT_COLUMN[name]}" if name in COUNT_COLUMN else "one per sample"
            return f"{name} holds {len(column)} items, expected {expected} ({what})"
    return None


def _values_problem(columns: dict[str, np.ndarray], layout: dict) -> tuple[int, str] | None:
    """(sample within the chunk, problem) of the first value out of range in a chunk's columns, found
    vectorised; None when every value is in range."""
    vocab, seq_len = layout["vocab_size"], layout["seq_len"]
    bounds = {"lengths": (1, seq_len + 1), "input_ids": (0, vocab), "word_starts": (0, 2),
              "masked_lm_counts": (0, layout["max_predictions"] + 1), "masked_lm_ids": (0, vocab),
              **{c: (0, 2) for c in LABEL_COLUMNS}}
    for name, column in columns.items():
        if name == "masked_lm_positions":
            lo, hi = 0, np.repeat(columns["lengths"], columns["masked_lm_counts"])
        else:
            lo, hi = bounds[name]
        bad = (column < lo) | (column >= hi)
        if not bad.any():
            continue
        at = int(np.flatnonzero(bad)[0])
        limit = hi if np.isscalar(hi) else int(hi[at])
        if name not in COUNT_COLUMN:
            return at, f"{name}: got {column[at]}, expected [{lo}, {limit})"
        ends = np.cumsum(columns[COUNT_COLUMN[name]], dtype=np.int64)
        row = int(np.searchsorted(ends, at, side="right"))
        position = at - (int(ends[row - 1]) if row else 0)
        return row, f"{name}: {column[at]} at position {position} is outside [{lo}, {limit})"
    return None


def _column_bound(name: str, samples: int, layout: dict) -> int:
    per_sample = {"input_ids": layout["seq_len"], "word_starts": layout["seq_len"],
                  "masked_lm_positions": layout["max_predictions"], "masked_lm_ids": layout["max_predictions"]}
    return NPY_HEADER_MAX + samples * per_sample.get(name, 1) * np.dtype(layout["columns"][name]).itemsize


def decode_shard(data, entry: dict, where: str) -> DecodedShard:
    """A whole shard file, decoded.  ``entry``: its shard entry from ``split_info`` (the manifest's entry
    plus the split's ``layout``); ``data``: the file's bytes, their size and sha256 already checked
    against it.  The members must be the chunks and columns the layout gives, in order, holding
    ``entry["samples"]`` samples and ``entry["tokens"]`` tokens with every value in range; anything else
    is a PrepError "<where>: ..." naming the member."""
    layout = entry["layout"]
    chunk, samples, names = layout["chunk_samples"], entry["samples"], list(layout["columns"])
    members = tar_members(data, where)  # as many as the bytes hold, whatever the entry claims
    count = -(-samples // chunk) * len(names)

    def expected(at: int) -> tuple[int, str]:  # (first sample, column) of member ``at``
        return at // len(names) * chunk, names[at % len(names)]

    for at, (name, _) in enumerate(members):
        want = member_name(sample_key(entry["split"], entry["index"], expected(at)[0]), expected(at)[1]) \
            if at < count else None
        if name != want:
            raise PrepError(f"{where}: member {at} is {name!r}, expected "
                            + (repr(want) if want else f"no more members ({count} for {samples} samples)"))
    if len(members) != count:
        raise PrepError(f"{where}: {len(members)} members, expected {count} for {samples} samples "
                        f"(the shard ends early)")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    last = names[-1]
    for at, (member, raw) in enumerate(members):
        first, name = expected(at)
        n = min(chunk, samples - first)
        parts[name].append(decode_column(raw, f"{where}: {member}", _column_bound(name, n, layout),
                                         layout["columns"][name]))
        if name == last:  # a whole chunk decoded: check it
            cols = {c: parts[c][-1] for c in layout["columns"]}
            problem = _counts_problem(cols, n)
            if problem:
                raise PrepError(f"{where}: chunk {sample_key(entry['split'], entry['index'], first)}: {problem}")
            bad = _values_problem(cols, layout)
            if bad:
                raise PrepError(f"{where}: sample {sample_key(entry['split'], entry['index'], first + bad[0])}: "
                                f"{bad[1]}")
    columns = {c: p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, layout["columns"][c])
               for c, p in parts.items()}
    for column in columns.values():
        column.flags.writeable = False  # as a single chunk's views into its decompressed bytes are
    tokens = int(columns["lengths"].sum(dtype=np.int64))
    if "tokens" in entry and tokens != entry["tokens"]:
        raise PrepError(f"{where}: holds {tokens} tokens, the manifest says {entry['tokens']}")
    return DecodedShard(entry["name"], entry["split"], entry["index"], columns)


def wds_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Stock webdataset's samples of a shard (one per chunk: ``__key__``, ``<column>.npy.zst`` raw bytes)
    -> one dict per stored sample (``__key__`` its sample key, then field name -> numpy array or int,
    as ``DecodedShard.sample``): ``webdataset.WebDataset(urls).compose(wds_samples)``."""
    for chunk in src:
        key, url = chunk.get("__key__", ""), chunk.get("__url__", "shard")
        m = KEY.match(key.rsplit("/", 1)[-1])
        if not m:
            raise PrepError(f"{url}: {key!r} is not a data_prep chunk key (is this a format-2 shard?)")
        columns = {ext[:-len(MEMBER_SUFFIX)]: decode_column(raw, f"{url}: {key}.{ext}")
                   for ext, raw in chunk.items() if ext.endswith(MEMBER_SUFFIX)}
        if "lengths" not in columns:
            raise PrepError(f"{url}: chunk {key} has no lengths column")
        problem = _counts_problem(columns, len(columns["lengths"]))
        if problem:
            raise PrepError(f"{url}: chunk {key}: {problem}")
        decoded = DecodedShard(url, m.group(1), int(m.group(2)), columns, first=int(m.group(3)))
        for i in range(len(decoded)):
            yield {"__key__": decoded.key(i), "__url__": url, **decoded.sample(i)}


def read_entry(store, entry: dict) -> DecodedShard:
    """Shard ``entry`` (of ``split_info``) of a ``store.Store``: read whole, size and sha256 checked while
    read, decoded (``decode_shard``); PrepError naming the shard otherwise."""
    return decode_shard(store.read_checked(entry["name"], entry["bytes"], entry["sha256"]), entry,
                        store.where(entry["name"]))


def iter_split_shards(out_dir, manifest: dict, split: str) -> Iterator[tuple[str, DecodedShard]]:
    """(where, decoded shard) of a local split in manifest order, each read whole and checked against
    the manifest (``read_entry``) before it is yielded."""
    from data_prep.shards.store import open_store

    store = open_store(str(out_dir))
    for entry in split_info(manifest, split)["shards"]:
        yield store.where(entry["name"]), read_entry(store, entry)


def iter_split_samples(out_dir, manifest: dict, split: str,
                       limit: int | None = None) -> Iterator[tuple[str, str, str, dict]]:
    """(where, shard name, key, decoded sample) in manifest order, at most ``limit`` (``iter_split_shards``);
    ``where`` names shard and sample for errors."""
    n = 0
    if limit is not None and limit <= 0:
        return
    for path, shard in iter_split_shards(out_dir, manifest, split):
        for i in range(len(shard) if limit is None else min(len(shard), limit - n)):
            key = shard.key(i)
            yield f"{path}: sample {key}", shard.name, key, shard.sample(i)
            n += 1
        if limit is not None and n >= limit:
            return  # before the next shard is read


__all__ = ["DecodedShard", "decode_column", "decode_shard", "iter_split_samples", "iter_split_shards", "read_entry",
           "tar_members", "wds_samples"]
