"""The shard directory's bookkeeping: settings fingerprint, resume records, manifest, node merge.

Layout: ``manifest.json`` (or ``manifest.node-R-of-K.json`` per node before ``merge``), the shards,
``tokenizer/`` (a copy of the run's tokenizer), ``progress/<shard>.json`` (a claim written before a
shard is built, replaced by its record once the shard is renamed into place) and the lock file.

Ownership: data_prep replaces or removes only what it can show it wrote: shards that one of its
records or manifests names, its own records and manifests, a tokenizer copy with its
vocab_info.json.  Any other file at one of those names stops the run (``--overwrite`` included);
files at other names are never touched.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from data_prep import __version__
from data_prep.builder import ShardSettings, WorkUnit
from data_prep.config import PrepConfig
from data_prep.errors import PrepError
from data_prep.fsutil import (atomic_write_json, canonical_json, locked_dir, read_json_or_none, remove_temps,
                             sha256_text)
from data_prep.shards import (CHUNK_SAMPLES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARD_NAME, SPLITS, ZSTD_LEVEL,
                              shard_name)
from data_prep.vocab import (INFO_FILE, TOKENIZER_FILES, TOKENIZER_FORMAT, install_tokenizer_dir, read_tokenizer,
                             save_tokenizer_dir, tokenizer_hash)

PROGRESS_DIR = "progress"
TOKENIZER_SUBDIR = "tokenizer"


def node_manifest_name(rank: int, num_nodes: int) -> str:
    return f"manifest.node-{rank:05d}-of-{num_nodes:05d}.json"

def settings_fingerprint(cfg: PrepConfig, info) -> str:
    """What a shard's bytes depend on besides its unit's documents."""
    s = cfg.shards
    return sha256_text(canonical_json({
        "format_version": FORMAT_VERSION, "chunk_samples": CHUNK_SAMPLES, "zstd_level": ZSTD_LEVEL,
        "tokenizer": info.sha256, "seed": cfg.seed,
        "seq_len": s.seq_len, "objective": s.objective, "masking": s.masking, "whole_word_mask": s.whole_word_mask,
        "dupe_factor": s.dupe_factor, "max_predictions": s.max_predictions, "masked_lm_prob": s.masked_lm_prob,
        "short_seq_prob": s.short_seq_prob}))


OWN_FILES_HINT = "data_prep replaces only files it wrote: move it away, or use a new --out directory"
MISMATCH_HINT = "use a new --out directory, or --overwrite to replace its shards"
NODE_MANIFEST = re.compile(r"^manifest\.node-\d+-of-\d+\.json$")


def is_own_name(relative: Path) -> bool:
    """Whether a path inside a shard or tokenizer directory is at a name data_prep writes there."""
    if len(relative.parts) > 1:
        return relative.parts[0] in (TOKENIZER_SUBDIR, PROGRESS_DIR)
    name = relative.name
    return bool(SHARD_NAME.match(name) or NODE_MANIFEST.match(name)) or name in (MANIFEST, *TOKENIZER_FILES)


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS_DIR / f"{name}.json"


def is_own_record(path: Path) -> bool:
    """A progress record (or claim) of ours; one cut by a crash (not JSON) counts as ours, to rebuild."""
    data = read_json_or_none(path)
    return data is None or (isinstance(data, dict) and data.get("name") == path.stem)


def record_files(out_dir: Path) -> list[Path]:
    """The files at progress-record names (whether ours or not: see is_own_record)."""
    return [p for p in sorted((out_dir / PROGRESS_DIR).glob("*.json")) if SHARD_NAME.match(p.stem)]


def manifest_files(out_dir: Path) -> list[Path]:
    """The files at manifest names (whether ours or not: see foreign_files)."""
    return [p for p in sorted(out_dir.glob("manifest*.json")) if p.name == MANIFEST or NODE_MANIFEST.match(p.name)]


def foreign_files(out_dir: Path) -> list[Path]:
    """Files at names data_prep writes in ``out_dir`` that it cannot show it wrote: a shard no progress
    record or manifest of ours names, a manifest or record of another format, a tokenizer copy
    without our vocab_info.json."""
    foreign, named = [], set()
    for p in record_files(out_dir):
        if is_own_record(p):
            named.add(p.stem)
        else:
            foreign.append(p)
    for p in manifest_files(out_dir):
        data = read_json_or_none(p)
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            foreign.append(p)
        else:
            named.update(str(s.get("name")) for s in data.get("shards", []) if isinstance(s, dict))
    foreign += [p for p in sorted(out_dir.glob("*.tar")) if SHARD_NAME.match(p.name) and p.name not in named]
    tok = out_dir / TOKENIZER_SUBDIR
    info = read_json_or_none(tok / INFO_FILE)
    if not (isinstance(info, dict) and info.get("format") == TOKENIZER_FORMAT):
        foreign += [tok / f for f in TOKENIZER_FILES if (tok / f).exists()]
    return foreign + [p for p in (out_dir / PROGRESS_DIR, tok) if p.exists() and not p.is_dir()]


def refuse_foreign_files(out_dir: Path) -> None:
    foreign = foreign_files(out_dir)
    if foreign:
        more = f" (and {len(foreign) - 1} more such files)" if len(foreign) > 1 else ""
        raise PrepError(f"{foreign[0]}: not written by data_prep (no manifest or progress record of {out_dir} "
                        f"names it){more}; {OWN_FILES_HINT}")


def manifest_settings(manifest: dict) -> str | None:
    """The settings fingerprint of a manifest (one written before content fingerprints: its fingerprint)."""
    return manifest.get("settings_fingerprint", manifest.get("fingerprint"))


def prepare_out_dir(out_dir: Path, tokenizer, info, fingerprint: str, overwrite: bool) -> None:
    """Refuse foreign files, and (unless ``overwrite``) a directory made with another tokenizer or
    settings; install the tokenizer copy.  ``overwrite`` removes the manifests: what they describe
    is about to be replaced (the shards of other settings are rebuilt unit by unit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    refuse_foreign_files(out_dir)
    if overwrite:
        for p in manifest_files(out_dir):
            p.unlink()
    tok_dir = out_dir / TOKENIZER_SUBDIR
    if (tok_dir / INFO_FILE).is_file():
        old = (read_json_or_none(tok_dir / INFO_FILE) or {}).get("sha256")
        if old != info.sha256:
            # vocab_info.json only caches the hash: recompute it from the copy before calling it a mismatch.
            old = tokenizer_hash(read_tokenizer(tok_dir, validate=False))
            if old != info.sha256 and not overwrite:
                raise PrepError(f"{out_dir}: its shards were tokenized with tokenizer {old[:12]}..., but this run's "
                                f"tokenizer is {info.sha256[:12]}... (mismatched tokenizer); {MISMATCH_HINT}")
            save_tokenizer_dir(tokenizer, tok_dir, info=info)
    else:
        install_tokenizer_dir(tokenizer, tok_dir, info)
    for f in [] if overwrite else [*manifest_files(out_dir), *record_files(out_dir)]:
        data = read_json_or_none(f)  # a damaged record is rebuilt
        old = manifest_settings(data) if isinstance(data, dict) else fingerprint
        if old != fingerprint:
            raise PrepError(f"{f}: written with other shard settings or seed (fingerprint {str(old)[:12]}... vs "
                            f"{fingerprint[:12]}...); {MISMATCH_HINT}")
    (out_dir / PROGRESS_DIR).mkdir(exist_ok=True)


def finished_record(out_dir: Path, unit: WorkUnit, fingerprint: str, overwrite: bool) -> dict | None:
    """The record of ``unit``'s shard if it is finished; None if it is to be (re)built.  A shard of these
    settings built from other documents is refused unless ``overwrite``: the corpus differs."""
    name = shard_name(unit.split, unit.index)
    path = record_path(out_dir, name)
    record = read_json_or_none(path)
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if record.get("unit_sha256") != unit.digest and not overwrite:
        raise PrepError(f"{path}: {name} was built from other documents than this run's unit {unit.index} of "
                        f"{unit.split} (a different corpus, or input changed); {MISMATCH_HINT}")
    tar = out_dir / name
    if record.get("unit_sha256") != unit.digest or not tar.is_file() or tar.stat().st_size != record.get("bytes"):
        return None
    return record


def claim(out_dir: Path, unit: WorkUnit, fingerprint: str) -> None:
    """Record that this run is building ``unit``'s shard (before it exists), so that a shard renamed
    into place by a run killed before its record was written is still known to be ours."""
    name = shard_name(unit.split, unit.index)
    atomic_write_json(record_path(out_dir, name), {"name": name, "fingerprint": fingerprint,
                                                    "unit_sha256": unit.digest, "building": True}, durable=False)


def data_fingerprint(settings: str, shards: list[dict]) -> str:
    """What the samples depend on: the settings and every shard's content (names and sha256, in order)."""
    return sha256_text(canonical_json({"settings": settings, "shards": [[s["name"], s["sha256"]] for s in shards]}))


def assemble_manifest(cfg: PrepConfig, info, fingerprint: str, settings: ShardSettings, records: list[dict],
                      counts: Counter, stats: Counter) -> dict:
    records = sorted(records, key=lambda r: (SPLITS.index(r["split"]), r["index"]))
    shards = [{k: v for k, v in r.items() if k != "fingerprint"} for r in records]
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "data_prep_version": __version__,
        "fingerprint": data_fingerprint(fingerprint, shards), "settings_fingerprint": fingerprint, "seed": cfg.seed,
        "tokenizer": {"sha256": info.sha256, "vocab_size": info.vocab_size, "lowercase": info.lowercase,
                      "dir": TOKENIZER_SUBDIR,
                      "special_ids": {"pad": info.pad_id, "unk": info.unk_id, "cls": info.cls_id,
                                      "sep": info.sep_id, "mask": info.mask_id}},
        "sample_format": {
            "objective": settings.objective, "masking": settings.masking,
            "whole_word_mask": settings.whole_word_mask, "seq_len": settings.seq_len,
            "max_predictions": settings.max_predictions, "masked_lm_prob": settings.masked_lm_prob,
            "short_seq_prob": settings.short_seq_prob, "dupe_factor": settings.dupe_factor,
            "token_dtype": settings.token_dtype, "sentence_label_key": settings.label_key,
            "columns": settings.columns(), "chunk_samples": CHUNK_SAMPLES,
            "compression": {"codec": "zstd", "level": ZSTD_LEVEL}},
        "config": {"input": vars(cfg.input), "clean": vars(cfg.clean),
                   "shards": {"val_fraction": cfg.shards.val_fraction,
                              "text_per_shard_mb": cfg.shards.text_per_shard_mb}},
        "corpus": dict(sorted(counts.items())),
        "units": {s: stats[f"units_{s}"] for s in SPLITS},
        "splits": split_totals(shards),
        "shards": shards,
    }


def split_totals(shards: list[dict]) -> dict:
    totals = {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        totals[split] = {k: sum(s[k] for s in mine) for k in ("samples", "tokens", "documents", "bytes")}
        totals[split]["shards"] = len(mine)
    return totals


def remove_out_dir_temps(out_dir: Path) -> None:
    """Remove the temp files of killed or failed runs from the shard directory and its subdirectories;
    only while holding its lock, with no other run of ours writing there."""
    for directory in (out_dir, out_dir / PROGRESS_DIR, out_dir / TOKENIZER_SUBDIR):
        remove_temps(directory)


def remove_stale_shards(out_dir: Path, units: dict, overwrite: bool) -> None:
    """Shards (and records) left by an earlier run over a larger corpus are not part of this one; unless
    ``overwrite``, finding any means the corpus differs (it is smaller) and is refused."""
    stale = [f for f in sorted(out_dir.glob("*.tar"))
             if (m := SHARD_NAME.match(f.name)) and int(m.group(2)) >= units.get(m.group(1), 0)]
    if stale and not overwrite:
        raise PrepError(f"{stale[0]}: not part of this run's shards, which end before it (a different corpus, "
                        f"smaller than the one it was built from); {MISMATCH_HINT}")
    for f in stale:
        f.unlink()
        record_path(out_dir, f.name).unlink(missing_ok=True)


def merge_node_manifests(out_dir) -> dict:
    """Join the per-node manifests of a multi-node run into manifest.json, checking completeness."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise PrepError(f"{out_dir}: no such directory")
    with locked_dir(out_dir):
        return _merge(out_dir)


def _merge(out_dir: Path) -> dict:
    refuse_foreign_files(out_dir)  # first: a node manifest of another format is refused, not parsed
    parts = [p for p in manifest_files(out_dir) if NODE_MANIFEST.match(p.name)]
    if not parts:
        raise PrepError(f"{out_dir}: no node manifests (manifest.node-*-of-*.json) to merge")
    manifests = [json.loads(p.read_text()) for p in parts]
    num_nodes = manifests[0]["node"]["num_nodes"]
    ranks = sorted(m["node"]["rank"] for m in manifests)
    problems = []
    if ranks != list(range(num_nodes)) or any(m["node"]["num_nodes"] != num_nodes for m in manifests):
        problems.append(f"expected node manifests of ranks 0..{num_nodes - 1}, found ranks {ranks}")
    for m, p in zip(manifests, parts):
        if manifest_settings(m) != manifest_settings(manifests[0]) or m["units"] != manifests[0]["units"]:
            problems.append(f"{p.name}: other settings or input than {parts[0].name}")
    shards = [s for m in manifests for s in m["shards"]]
    for split in SPLITS:
        have = sorted(s["index"] for s in shards if s["split"] == split)
        if have != list(range(manifests[0]["units"][split])):
            problems.append(f"{split}: shard indices {have[:5]}... do not cover 0..{manifests[0]['units'][split] - 1}")
    if problems:
        raise PrepError(f"{out_dir}: cannot merge:\n" + "\n".join(f"  - {p}" for p in problems))
    merged = {k: v for k, v in manifests[0].items() if k != "node"}
    merged["shards"] = sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["index"]))
    merged["splits"] = split_totals(merged["shards"])
    merged["fingerprint"] = data_fingerprint(manifest_settings(merged), merged["shards"])
    merged["nodes"] = num_nodes
    remove_stale_shards(out_dir, merged["units"], overwrite=True)  # the node runs checked their units
    atomic_write_json(out_dir / MANIFEST, merged)
    remove_out_dir_temps(out_dir)  # left by killed or failed node runs (none is running now)
    return merged
