"""The names of the shard format: its version, file and sample names, splits and the members of a sample.

docs/data-format.md describes every field; a change to any of them is a new ``FORMAT_VERSION``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from data_prep.errors import PrepError

FORMAT_NAME = "bertforge-wds"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SPLIT_CODES = {"train": 0, "val": 1}
SHARD_NAME = re.compile(r"^(train|val)-(\d{6,})\.tar$")
KEY = re.compile(r"^(train|val)-(\d{6,})-(\d{6,})$")
SENTENCE_LABEL_KEYS = {"nsp": "nsp_label", "sop": "sop_label"}


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
