"""The names of the shard format: its version, file and sample names, splits and the columns of a chunk.

A shard is a plain tar of **chunks** of ``CHUNK_SAMPLES`` consecutive samples; a chunk is one member
per column, ``<chunk key>.<column>.npy.zst`` (a zstd frame of an ``.npy`` file), its key the
``sample_key`` of its first sample.  docs/data-format.md describes every column; a change to any of
them is a new ``FORMAT_VERSION``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from data_prep.errors import PrepError

FORMAT_NAME = "bertforge-wds"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SPLIT_CODES = {"train": 0, "val": 1}
SHARD_NAME = re.compile(r"^(train|val)-(\d{6,})\.tar$")
KEY = re.compile(r"^(train|val)-(\d{6,})-(\d{6,})$")
SENTENCE_LABEL_KEYS = {"nsp": "nsp_label", "sop": "sop_label"}

MEMBER_SUFFIX = ".npy.zst"
# Samples per chunk and zstd level of the shards data_prep writes (bench/shard_size.py measured the
# choice); a reader takes both from the manifest's sample_format.
CHUNK_SAMPLES = 16384
ZSTD_LEVEL = 6
# A ragged column holds the items of every sample of a chunk end to end; its count column says how
# many items each sample has.  The other columns hold one item per sample.
COUNT_COLUMN = {"input_ids": "lengths", "word_starts": "lengths",
                "masked_lm_positions": "masked_lm_counts", "masked_lm_ids": "masked_lm_counts"}
COUNT_COLUMNS = ("lengths", "masked_lm_counts")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, shard_index: int, position: int) -> str:
    return f"{split}-{shard_index:06d}-{position:06d}"


def parse_key(key: str) -> tuple[str, int, int]:
    """(split, shard index, position) of a key ``sample_key`` wrote; ValueError for any other key."""
    m = KEY.match(key)
    if not m:
        raise ValueError(f"not a data_prep sample key: {key!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def member_name(chunk_key: str, column: str) -> str:
    return f"{chunk_key}.{column}{MEMBER_SUFFIX}"


def sample_columns(objective: str, masking: str, whole_word_mask: bool) -> list[str]:
    """The columns of every chunk, in write order (docs/data-format.md, "Chunks and columns")."""
    out = ["lengths", "input_ids"]
    if masking == "dynamic" and whole_word_mask:
        out.append("word_starts")
    if masking == "static":
        out += ["masked_lm_counts", "masked_lm_positions", "masked_lm_ids"]
    if objective in SENTENCE_LABEL_KEYS:
        out.append(SENTENCE_LABEL_KEYS[objective])
    return out


def column_dtype(column: str, token_dtype: str) -> str:
    """The numpy dtype of a column: token ids in ``token_dtype``, counts and positions uint16, flags
    and labels uint8."""
    if column in ("input_ids", "masked_lm_ids"):
        return token_dtype
    return "uint8" if column in ("word_starts", *SENTENCE_LABEL_KEYS.values()) else "uint16"


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
