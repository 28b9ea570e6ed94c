"""``python -m data_prep convert V1_DIR --out NEW_DIR``: a format-1 shard directory rewritten as format 2,
the same samples in the same order.

The only reader of format 1 (one tar member per field of a sample: ``<key>.<field>.npy`` /
``<key>.<field>.cls``, as docs/data-format.md of data_prep 0.1 describes).  Every v1 shard is checked
against its manifest entry (size, sha256, keys in order, fields, counts) before it is rewritten.  The
new directory is built under a temporary name beside ``--out`` and renamed into place when complete;
an ``--out`` that exists and is not empty is refused.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data_prep import __version__
from data_prep.errors import PrepError, write_error
from data_prep.fsutil import atomic_write_json, temp_path_for
from data_prep.manifest import data_fingerprint, manifest_settings, split_totals
from data_prep.shards.format import (CHUNK_SAMPLES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, ZSTD_LEVEL, column_dtype,
                                     sample_columns, sample_key)
from data_prep.shards.reader import tar_members
from data_prep.shards.schema import manifest_problems, split_info
from data_prep.shards.store import open_store
from data_prep.shards.writer import ShardWriter

BATCH = 4096  # v1 samples gathered into columns at a time


def v2_manifest(v1: dict, where: str) -> dict:
    """The v1 manifest's fields with a v2 sample format (columns, chunks, compression for ``fields``);
    the shard entries still the v1 ones.  Checked as any v2 manifest is."""
    if not isinstance(v1, dict) or v1.get("format") != FORMAT_NAME or v1.get("format_version") != 1:
        found = (v1.get("format"), v1.get("format_version")) if isinstance(v1, dict) else type(v1).__name__
        raise PrepError(f"{where}: not a format-1 shard manifest (format, version: {found}); convert reads only those")
    fmt = {k: v for k, v in v1.get("sample_format", {}).items() if k != "fields"}
    try:
        fmt.update(columns=sample_columns(fmt["objective"], fmt["masking"], fmt["whole_word_mask"]),
                   chunk_samples=CHUNK_SAMPLES, compression={"codec": "zstd", "level": ZSTD_LEVEL})
    except KeyError as err:
        raise PrepError(f"{where}: sample_format.{err.args[0]}: missing") from None
    manifest = {**v1, "format_version": FORMAT_VERSION, "sample_format": fmt}
    problems = manifest_problems(manifest)
    if problems:
        raise PrepError(f"{where}: {'; '.join(problems[:10])}")
    return manifest


def v1_samples(data: bytes, entry: dict, fields: list[str], where: str):
    """The samples of a v1 shard ({field name: array or int}) in order, their keys and fields checked."""
    key, sample, position = None, {}, 0
    for name, raw in [*tar_members(data, where), (None, b"")]:
        k, _, ext = (name or "").partition(".")
        if k != key and key is not None:
            if list(sample) != fields or key != sample_key(entry["split"], entry["index"], position):
                raise PrepError(f"{where}: sample {position} is {key!r} with fields {list(sample)}, expected "
                                f"{sample_key(entry['split'], entry['index'], position)!r} with {fields}")
            yield {f.rpartition(".")[0]: v for f, v in sample.items()}
            sample, position = {}, position + 1
        if name is None:
            return
        key = k
        try:
            sample[ext] = np.load(io.BytesIO(raw), allow_pickle=False) if ext.endswith(".npy") else int(bytes(raw))
        except (ValueError, EOFError, OSError) as err:
            raise PrepError(f"{where}: {name}: cannot decode ({err})") from None


def _columns(samples: list[dict], columns: list[str]) -> dict:
    out = {}
    for c in columns:
        if c == "lengths":
            out[c] = np.array([len(s["input_ids"]) for s in samples])
        elif c == "masked_lm_counts":
            out[c] = np.array([len(s["masked_lm_positions"]) for s in samples])
        elif c in ("input_ids", "word_starts", "masked_lm_positions", "masked_lm_ids"):
            out[c] = np.concatenate([s[c] for s in samples]) if samples else np.zeros(0, np.int64)
        else:
            out[c] = np.array([s[c] for s in samples])
    return out


def _convert_shard(store, entry: dict, fields: list[str], columns: dict, out: Path) -> dict:
    where = store.where(entry["name"])
    data = store.read_checked(entry["name"], entry["bytes"], entry["sha256"])
    writer = ShardWriter(out / entry["name"], entry["split"], entry["index"], columns, CHUNK_SAMPLES, ZSTD_LEVEL)
    try:
        batch, samples, tokens = [], 0, 0
        for sample in v1_samples(data, entry, fields, where):
            batch.append(sample)
            samples, tokens = samples + 1, tokens + len(sample["input_ids"])
            if len(batch) == BATCH:
                writer.add(_columns(batch, list(columns)), len(batch))
                batch = []
        writer.add(_columns(batch, list(columns)), len(batch))
        if (samples, tokens) != (entry["samples"], entry["tokens"]):
            raise PrepError(f"{where}: {samples} samples / {tokens} tokens, its manifest says "
                            f"{entry['samples']} / {entry['tokens']}")
        record = writer.commit()
    except OSError as err:
        writer.abort()
        raise write_error(writer.path, err) from None
    except BaseException:
        writer.abort()
        raise
    return {**entry, "bytes": record["bytes"], "sha256": record["sha256"]}


def convert_dir(src, out) -> dict:
    """Write the v2 directory ``out`` from the v1 directory ``src``; returns its manifest."""
    src, out = Path(src), Path(out)
    where = str(src / MANIFEST)
    try:
        v1 = json.loads((src / MANIFEST).read_bytes())
    except OSError as err:
        raise PrepError(f"{where}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise PrepError(f"{where}: not valid JSON ({err})") from None
    manifest = v2_manifest(v1, where)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepError(f"{out}: exists and is not empty; convert writes a new directory (give another --out)")
    fields = v1["sample_format"].get("fields")
    fmt = manifest["sample_format"]
    columns = {c: column_dtype(c, fmt["token_dtype"]) for c in fmt["columns"]}
    store = open_store(str(src))
    tmp = temp_path_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shards = [_convert_shard(store, {k: v for k, v in entry.items() if k != "layout"}, fields, columns, tmp)
                  for split in ("train", "val") for entry in split_info(manifest, split)["shards"]]
        tok = manifest["tokenizer"]["dir"]
        shutil.copytree(src / tok, tmp / tok)
        manifest.update(data_prep_version=__version__, shards=shards, splits=split_totals(shards),
                        fingerprint=data_fingerprint(manifest_settings(manifest), shards),
                        converted_from=v1.get("fingerprint"))
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
