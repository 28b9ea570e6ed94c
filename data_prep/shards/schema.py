"""manifest.json of a shard directory: parsed, every field a reader uses checked (a missing or bad one
is named in one error), and the view a reader of one split needs (``split_info``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from data_prep.errors import PrepError
from data_prep.shards.format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, SENTENCE_LABEL_KEYS, SHARD_NAME, SPLITS,
                                     column_dtype, sample_columns, shard_name, shard_path)

CONVERT_HINT = "python -m data_prep convert {dir} --out <new dir>"


def parse_manifest(raw: bytes, where: str, out_dir=None) -> dict:
    """A manifest from its bytes, every field checked (``manifest_problems``): a missing key or bad value
    is one PrepError naming ``where`` and the key.  ``out_dir``: the local shard directory, whose shard
    names are then also checked not to lead outside it."""
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PrepError(f"{where}: format is {found!r}; expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version == 1:
        shard_dir = out_dir if out_dir is not None else where.rpartition("/")[0] or "."
        raise PrepError(f"{where}: shard format version 1, which this data_prep no longer reads; convert it "
                        f"(same samples, same order): `{CONVERT_HINT.format(dir=shard_dir)}`")
    if version != FORMAT_VERSION:
        raise PrepError(f"{where}: format_version {version} is not supported by this data_prep (it reads version "
                        f"{FORMAT_VERSION}); rebuild the shards")
    problems = manifest_problems(manifest, out_dir)
    if problems:
        shown = "; ".join(problems[:MAX_SHOWN]) + (f"; and {len(problems) - MAX_SHOWN} more" if
                                                    len(problems) > MAX_SHOWN else "")
        raise PrepError(f"{where}: {shown}" if len(problems) == 1 else f"{where}: {len(problems)} problems: {shown}")
    return manifest


def read_manifest(out_dir) -> dict:
    """The manifest of a finished local shard directory (``parse_manifest``), with ``dir`` (its absolute
    path) added."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise PrepError(f"{out_dir}: no {MANIFEST}; expected a directory written by `python -m data_prep shards` "
                        "(an unfinished multi-node run needs `python -m data_prep merge` first)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PrepError(f"{path}: cannot read ({err.strerror})") from None
    manifest = parse_manifest(raw, str(path), out_dir)
    manifest["dir"] = str(Path(out_dir).resolve())
    return manifest


# --------------------------------------------------------------------------------------------
# Manifest checks: every key a reader uses is present, of its type, and makes sense
# --------------------------------------------------------------------------------------------
MAX_SHOWN = 10  # problems named in one error
MAX_CHUNK_SAMPLES = 1 << 20  # 64x the chunk data_prep writes (format.CHUNK_SAMPLES)
MEMBER_MIN_BYTES = 1024      # a tar member: its 512-byte header and at least one 512-byte block of data
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a dict", list: "a list",
          type(None): "null"}


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


def _format_problems(problems: list[str], manifest: dict, vocab_size: int | None) -> dict | None:
    """Problems of the ``sample_format`` section; when its seq_len, chunk_samples and columns are
    valid, those three (what bounds a shard entry's counts, ``_shard_problems``)."""
    from data_prep.config import MASKING_MODES, OBJECTIVES, RANGES

    fmt = _typed(problems, manifest, "sample_format", "sample_format", dict)
    if fmt is None:
        return None
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
    chunk = _int_in(problems, fmt, "chunk_samples", where + "chunk_samples", 1, MAX_CHUNK_SAMPLES)
    compression = _typed(problems, fmt, "compression", where + "compression", dict)
    if compression is not None and compression.get("codec") != "zstd":
        problems.append(f"{where}compression.codec: got {compression.get('codec')!r}, expected 'zstd'")
    if objective in OBJECTIVES and masking in MASKING_MODES and whole_word is not None:
        if _columns_problems(problems, fmt, objective, masking, whole_word) and seq_len and chunk:
            return {"seq_len": seq_len, "chunk_samples": chunk, "columns": len(fmt["columns"])}
    return None


def _columns_problems(problems: list[str], fmt: dict, objective: str, masking: str, whole_word: bool) -> bool:
    """The sentence label key and the columns must be those the objective and masking give; whether
    the columns are."""
    label_key = SENTENCE_LABEL_KEYS.get(objective)
    if fmt.get("sentence_label_key") != label_key:
        problems.append(f"sample_format.sentence_label_key: {fmt.get('sentence_label_key')!r} does not fit "
                        f"objective {objective!r} (expected {label_key!r})")
    expected = sample_columns(objective, masking, whole_word)
    if fmt.get("columns") != expected:
        problems.append(f"sample_format.columns: {fmt.get('columns')} do not fit objective {objective!r}, masking "
                        f"{masking!r}, whole_word_mask {whole_word} (expected {expected})")
        return False
    return True


def _counts_problem(entry: dict, fmt: dict) -> str | None:
    """Why a shard entry's samples and tokens cannot be (None when they can): a chunk's member of each
    column takes a 512-byte tar header and at least one padded 512-byte block, so ``bytes`` hold at most
    ceil(bytes / (1024 * columns)) chunks; every sample has 1 to seq_len tokens.  Checked before any
    reader sizes anything by the claimed counts."""
    samples, tokens, size = entry["samples"], entry["tokens"], entry["bytes"]
    chunks = -(-size // (MEMBER_MIN_BYTES * fmt["columns"]))
    if samples > chunks * fmt["chunk_samples"]:
        return (f"samples: {samples:,} cannot fit in {size:,} bytes (at most {chunks * fmt['chunk_samples']:,} in "
                f"chunks of {fmt['chunk_samples']:,}: each of a chunk's {fmt['columns']} columns takes at least "
                f"{MEMBER_MIN_BYTES} bytes)")
    if not samples <= tokens <= samples * fmt["seq_len"]:
        return (f"tokens: {tokens:,} for {samples:,} samples, expected 1 to seq_len ({fmt['seq_len']}) "
                f"a sample: [{samples:,}, {samples * fmt['seq_len']:,}]")
    return None


def _shard_problems(problems: list[str], manifest: dict, out_dir, fmt: dict | None) -> None:
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
        counts = [_int_in(problems, entry, key, f"{where}.{key}", 0) for key in ("samples", "tokens", "bytes")]
        problem = _counts_problem(entry, fmt) if fmt is not None and None not in counts else None
        if problem:
            problems.append(f"{where}.{problem}")
        digest = _typed(problems, entry, "sha256", where + ".sha256", str)
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"{where}.sha256: {digest!r} is not a sha256 hex digest")
        if name is None:
            continue
        try:
            if out_dir is None and not SHARD_NAME.match(name):
                raise PrepError(f"{name!r} is not a plain shard file name (like {shard_name('train', 0)})")
            if out_dir is not None:
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


def manifest_problems(manifest: dict, out_dir=None) -> list[str]:
    """Every problem of a manifest's fields, each naming its key: what a reader needs is present, of its
    type and consistent (special ids below the vocabulary size, columns that fit the objective and the
    masking, seq_len and max_predictions in range, plain shard names, confined to ``out_dir`` if given,
    shard counts that the shard's bytes can hold)."""
    problems: list[str] = []
    _typed(problems, manifest, "fingerprint", "fingerprint", str)
    if manifest.get("converted_from") is not None:  # convert's output only; a checkpoint's fingerprint is matched to it
        source = _typed(problems, manifest, "converted_from", "converted_from", str)
        if source is not None and not re.fullmatch(r"[0-9a-f]{64}", source):
            problems.append(f"converted_from: got {source[:80]!r}, expected a sha256 (64 hex digits)")
    _int_in(problems, manifest, "seed", "seed", 0)
    fmt = _format_problems(problems, manifest, _tokenizer_problems(problems, manifest))
    _shard_problems(problems, manifest, out_dir, fmt)
    return problems


def shard_layout(manifest: dict) -> dict:
    """What ``reader.decode_shard`` checks a shard against: its columns (name -> dtype, in member order),
    samples per chunk and the value bounds."""
    fmt = manifest["sample_format"]
    return {"columns": {c: column_dtype(c, fmt["token_dtype"]) for c in fmt["columns"]},
            "chunk_samples": fmt["chunk_samples"], "seq_len": fmt["seq_len"],
            "max_predictions": fmt["max_predictions"], "vocab_size": manifest["tokenizer"]["vocab_size"]}


def split_info(manifest: dict, split: str) -> dict:
    """What a reader of one split needs: its shards (the manifest's entries: name, samples, bytes,
    sha256, ..., each with the ``layout`` that ``decode_shard`` reads) and its sample format.
    ``data_prep.loader.example_from_sample`` reads this dict."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fmt = manifest["sample_format"]
    tok = manifest["tokenizer"]
    layout = shard_layout(manifest)
    tok_dir = tok.get("dir")
    if tok_dir and manifest.get("dir"):
        tok_dir = str(Path(manifest["dir"]) / tok_dir)
    return {
        "shards": [{**s, "layout": layout} for s in manifest["shards"] if s["split"] == split],
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
        "converted_from": manifest.get("converted_from"),  # convert's output: the format-1 fingerprint
        "seed": manifest["seed"],
    }
