"""Reading shards: a shard is opened against its manifest entry (size and sha256), indexed once (its
members grouped into samples, with their offsets) and read by sample, in order or at random.

One key rule, webdataset's: a member ``<dir>/<key>.<ext>`` (``ext`` from the first dot of the base
name) belongs to sample ``<dir>/<key>``, and a sample is a run of adjacent members with one key.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import BinaryIO, Iterator

import numpy as np

from data_prep.errors import PrepError
from data_prep.fsutil import sha256_stream
from data_prep.shards.format import shard_path
from data_prep.shards.schema import split_info

# [(key, {extension: (offset, size)})] of a shard, in file order
TarIndex = list[tuple[str, dict[str, tuple[int, int]]]]


def tar_index(f: BinaryIO, name) -> TarIndex:
    """The samples of a tar (a binary file open at its start) in file order, each member's data located
    by offset and size; PrepError naming ``name`` when it is not a readable tar."""
    samples: TarIndex = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(head, stem)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as err:
        raise PrepError(f"{name}: not a readable tar ({err}); run `python -m data_prep verify` on its directory") \
            from None
    return samples


def read_members(f: BinaryIO, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """{extension: raw bytes} of one sample of a ``tar_index``."""
    out = {}
    for ext, (offset, size) in members.items():
        f.seek(offset)
        out[ext] = f.read(size)
    return out


def iter_tar_samples(source) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: raw bytes}) per sample of a tar, in file order.  ``source``: a path, or a
    binary file open at the tar's start (e.g. from ``open_shard``)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from iter_tar_samples(f)
        return
    for key, members in tar_index(source, getattr(source, "name", "tar")):
        yield key, read_members(source, members)


def decode_fields(fields: dict[str, bytes], where: str = "sample") -> dict:
    """Raw member bytes -> numpy arrays (``.npy``) and ints (``.cls``), by field name (``input_ids``);
    a member that does not decode raises PrepError naming ``where`` (e.g. "<shard>: sample <key>")."""
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


def shard_file_problem(f: BinaryIO, entry: dict) -> str | None:
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


def open_shard(out_dir, entry: dict) -> BinaryIO:
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


def index_shard(out_dir, entry: dict) -> tuple[BinaryIO, TarIndex]:
    """A shard opened (``open_shard``) and indexed (``tar_index``); PrepError naming it when it holds
    another number of samples than its manifest entry."""
    path = shard_path(out_dir, entry["name"])
    f = open_shard(out_dir, entry)
    try:
        index = tar_index(f, path)
    except PrepError:
        f.close()
        raise
    if len(index) != entry["samples"]:
        f.close()
        raise PrepError(f"{path}: holds {len(index)} samples but the manifest says {entry['samples']}; "
                        f"run `python -m data_prep verify {out_dir}`")
    return f, index


def iter_split_samples(out_dir, manifest: dict, split: str,
                       limit: int | None = None) -> Iterator[tuple[str, str, str, dict]]:
    """(where, shard name, key, decoded sample) in manifest order, at most ``limit``; every shard is
    checked against the manifest first (``index_shard``); ``where`` names shard and sample for errors."""
    n = 0
    for shard in split_info(manifest, split)["shards"]:
        if limit is not None and n >= limit:
            return
        path = shard_path(out_dir, shard["name"])
        f, index = index_shard(out_dir, shard)
        with f:
            for key, members in index[:None if limit is None else limit - n]:
                where = f"{path}: sample {key}"
                yield where, shard["name"], key, decode_fields(read_members(f, members), where)
                n += 1

