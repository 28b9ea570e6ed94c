"""The shard directory's bookkeeping: settings fingerprint, resume records, manifest, node merge.

Layout: ``manifest.json`` (or ``manifest.node-R-of-K.json`` per node before ``merge``), the shards,
``tokenizer/`` (a copy of the run's tokenizer) and ``progress/<shard>.json`` (one record per
finished shard, written after the shard is renamed into place).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from data_prep import __version__
from data_prep.builder import ShardSettings, WorkUnit
from data_prep.config import PrepConfig
from data_prep.errors import PrepError
from data_prep.fsutil import (atomic_write_json, canonical_json, locked_dir, read_json_or_none, remove_temps,
                             sha256_text)
from data_prep.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARD_NAME, SPLITS, shard_name
from data_prep.vocab import INFO_FILE, read_tokenizer, save_tokenizer_dir, tokenizer_hash

PROGRESS_DIR = "progress"
TOKENIZER_SUBDIR = "tokenizer"


def node_manifest_name(rank: int, num_nodes: int) -> str:
    return f"manifest.node-{rank:05d}-of-{num_nodes:05d}.json"

def settings_fingerprint(cfg: PrepConfig, info) -> str:
    """What a shard's bytes depend on besides its unit's documents."""
    s = cfg.shards
    return sha256_text(canonical_json({
        "format_version": FORMAT_VERSION, "tokenizer": info.sha256, "seed": cfg.seed,
        "seq_len": s.seq_len, "objective": s.objective, "masking": s.masking, "whole_word_mask": s.whole_word_mask,
        "dupe_factor": s.dupe_factor, "max_predictions": s.max_predictions, "masked_lm_prob": s.masked_lm_prob,
        "short_seq_prob": s.short_seq_prob}))


def clear_outputs(out_dir: Path) -> None:
    """Remove what a shards run writes (and nothing else) from ``out_dir``."""
    for f in out_dir.glob("*.tar"):
        if SHARD_NAME.match(f.name):
            f.unlink()
    for f in list(out_dir.glob("manifest*.json")):
        f.unlink()
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / TOKENIZER_SUBDIR, ignore_errors=True)


def prepare_out_dir(out_dir: Path, tokenizer, info, fingerprint: str, overwrite: bool) -> None:
    """Refuse a directory made with another tokenizer or settings; install the tokenizer copy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_outputs(out_dir)
    hint = "use a new --out directory, or --overwrite to replace its shards"
    existing_tok = out_dir / TOKENIZER_SUBDIR / INFO_FILE
    if existing_tok.is_file():
        old = (read_json_or_none(existing_tok) or {}).get("sha256")
        if old != info.sha256:
            # vocab_info.json only caches the hash: recompute it from the copy before calling it a mismatch.
            old = tokenizer_hash(read_tokenizer(out_dir / TOKENIZER_SUBDIR, validate=False))
            if old != info.sha256:
                raise PrepError(f"{out_dir}: its shards were tokenized with tokenizer {old[:12]}..., but this run's "
                                f"tokenizer is {info.sha256[:12]}... (mismatched tokenizer); {hint}")
            save_tokenizer_dir(tokenizer, out_dir / TOKENIZER_SUBDIR, info=info)
    for f in [*out_dir.glob("manifest*.json"), *(out_dir / PROGRESS_DIR).glob("*.json")]:
        old = (read_json_or_none(f) or {}).get("fingerprint", fingerprint)  # a damaged record is rebuilt
        if old != fingerprint:
            raise PrepError(f"{f}: written with other shard settings or seed (fingerprint {str(old)[:12]}... vs "
                            f"{fingerprint[:12]}...); {hint}")
    if not existing_tok.is_file():
        save_tokenizer_dir(tokenizer, out_dir / TOKENIZER_SUBDIR, info=info)
    (out_dir / PROGRESS_DIR).mkdir(exist_ok=True)


def finished_record(out_dir: Path, unit: WorkUnit, fingerprint: str) -> dict | None:
    name = shard_name(unit.split, unit.index)
    record = read_json_or_none(out_dir / PROGRESS_DIR / f"{name}.json")
    tar = out_dir / name
    if record is None or record.get("fingerprint") != fingerprint or record.get("unit_sha256") != unit.digest or \
            not tar.is_file() or tar.stat().st_size != record.get("bytes"):
        return None
    return record

def assemble_manifest(cfg: PrepConfig, info, fingerprint: str, settings: ShardSettings, records: list[dict],
                      counts: Counter, stats: Counter) -> dict:
    records = sorted(records, key=lambda r: (SPLITS.index(r["split"]), r["index"]))
    shards = [{k: v for k, v in r.items() if k != "fingerprint"} for r in records]
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "data_prep_version": __version__,
        "fingerprint": fingerprint, "seed": cfg.seed,
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
            "fields": settings.fields()},
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


def remove_stale_shards(out_dir: Path, units: dict) -> None:
    """Shards (and records) left by an earlier run over a larger corpus are not part of this one."""
    for f in out_dir.glob("*.tar"):
        m = SHARD_NAME.match(f.name)
        if m and int(m.group(2)) >= units.get(m.group(1), 0):
            f.unlink()
            (out_dir / PROGRESS_DIR / f"{f.name}.json").unlink(missing_ok=True)

def merge_node_manifests(out_dir) -> dict:
    """Join the per-node manifests of a multi-node run into manifest.json, checking completeness."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise PrepError(f"{out_dir}: no such directory")
    with locked_dir(out_dir):
        return _merge(out_dir)


def _merge(out_dir: Path) -> dict:
    parts = sorted(out_dir.glob("manifest.node-*-of-*.json"))
    if not parts:
        raise PrepError(f"{out_dir}: no node manifests (manifest.node-*-of-*.json) to merge")
    manifests = [json.loads(p.read_text()) for p in parts]
    num_nodes = manifests[0]["node"]["num_nodes"]
    ranks = sorted(m["node"]["rank"] for m in manifests)
    problems = []
    if ranks != list(range(num_nodes)) or any(m["node"]["num_nodes"] != num_nodes for m in manifests):
        problems.append(f"expected node manifests of ranks 0..{num_nodes - 1}, found ranks {ranks}")
    for m, p in zip(manifests, parts):
        if m["fingerprint"] != manifests[0]["fingerprint"] or m["units"] != manifests[0]["units"]:
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
    merged["nodes"] = num_nodes
    remove_stale_shards(out_dir, merged["units"])
    atomic_write_json(out_dir / MANIFEST, merged)
    for directory in (out_dir, out_dir / PROGRESS_DIR, out_dir / TOKENIZER_SUBDIR):
        remove_temps(directory)  # left by killed or failed node runs (none is running now)
    return merged
