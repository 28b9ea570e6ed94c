"""verify, stats and inspect: checks and views of a finished shard directory."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.errors import PrepError
from data_prep.fsutil import TMP_PREFIX
from data_prep.loader import example_from_sample
from data_prep.masking import BPE_WORD_START, mask_sample, masking_config
from data_prep.shards import (MANIFEST, SHARD_NAME, SPLITS, iter_split_samples, iter_split_shards, read_entry,
                              read_manifest, split_info)
from data_prep.shards.store import open_store


def verify_dir(out_dir, deep: bool = True) -> tuple[list[str], list[str]]:
    """(problems, warnings).  The manifest's fields (``read_manifest``: a bad one is a PrepError) and
    split totals; every shard's size and sha256 against the manifest; with ``deep``, also its
    contents (``decode_shard``: chunks and columns in order, sample and token counts, values in range)."""
    from data_prep.vocab import INFO_FILE, read_tokenizer, tokenizer_hash

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    problems, warnings = _total_problems(manifest), []
    tok_dir = out_dir / manifest["tokenizer"]["dir"]
    if not (tok_dir / INFO_FILE).is_file():
        problems.append(f"{tok_dir}: tokenizer copy missing")
    elif tokenizer_hash(read_tokenizer(tok_dir)) != manifest["tokenizer"]["sha256"]:
        problems.append(f"{tok_dir}: tokenizer does not hash to the manifest's {manifest['tokenizer']['sha256']}")
    store = open_store(str(out_dir))
    listed = set()
    for entry in [e for split in SPLITS for e in split_info(manifest, split)["shards"]]:
        listed.add(entry["name"])
        try:
            if deep:
                read_entry(store, entry)
            else:
                store.read_checked(entry["name"], entry["bytes"], entry["sha256"])
        except PrepError as err:
            problems.append(str(err))
    for f in sorted(out_dir.iterdir()):
        if SHARD_NAME.match(f.name) and f.name not in listed:
            warnings.append(f"{f.name}: not in the manifest (left from another run?)")
        elif f.name.startswith(TMP_PREFIX):
            warnings.append(f"{f.name}: temporary file of an interrupted run (a rerun removes it)")
    return problems, warnings


def _total_problems(manifest: dict) -> list[str]:
    """The split totals and unit counts must be those of the shard list, whose indices run 0..N-1."""
    problems = []
    for split in SPLITS:
        mine = [s for s in manifest["shards"] if s["split"] == split]
        held = {"shards": len(mine), **{key: sum(s[key] for s in mine) for key in ("samples", "tokens", "bytes")}}
        for key, value in held.items():
            if manifest["splits"][split].get(key) != value:
                problems.append(f"{MANIFEST}: splits.{split}.{key} is {manifest['splits'][split].get(key)} but its "
                                f"shards hold {value}")
        if sorted(s["index"] for s in mine) != list(range(len(mine))):
            problems.append(f"{MANIFEST}: the {split} shards' indices are not 0..{len(mine) - 1} (a shard is missing "
                            f"from the list)")
        units = manifest.get("units", {}).get(split) if isinstance(manifest.get("units"), dict) else None
        if units != len(mine):
            problems.append(f"{MANIFEST}: units.{split} is {units} but {len(mine)} {split} shards are listed")
    return problems


def collect_stats(out_dir, split: str = "train", limit: int | None = None, epoch: int = 0) -> dict:
    """Lengths, tokens, masking (as stored, or as the loader would mask in ``epoch``) and labels, from
    the decoded columns of each shard (dynamic masks drawn per sample, as the loader draws them)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    info = split_info(manifest, split)
    special = info["special_ids"]
    specials = np.array(sorted(special.values()))
    seq_len = info["seq_len"]
    config = masking_config(int(info["vocab_size"]), int(special["mask"]), tuple(int(v) for v in special.values()),
                            float(info["mlm_probability"]), int(info["max_predictions"]))
    all_lengths, labels = [], Counter()
    tokens = unk = maskable = masked = as_mask = as_same = ordinal = 0
    for _, shard in iter_split_shards(out_dir, manifest, split) if limit is None or limit > 0 else ():
        cols = shard.columns
        n = len(shard) if limit is None else min(len(shard), limit - ordinal)
        lengths = cols["lengths"][:n].astype(np.int64)
        ids = cols["input_ids"][:int(lengths.sum())]
        if info["dynamic"]:
            original = ids
            for i in range(n):
                s = shard.sample(i)
                m = mask_sample(s["input_ids"], config, seed=manifest["seed"], epoch=epoch, sample_index=ordinal + i,
                                word_starts=s.get("word_starts"))
                shown = m.input_ids[m.masked_lm_positions]
                masked += len(shown)
                as_mask += int(np.count_nonzero(shown == special["mask"]))
                as_same += int(np.count_nonzero(shown == m.masked_lm_ids))
        else:
            counts = cols["masked_lm_counts"][:n]
            at = np.repeat(np.cumsum(lengths) - lengths, counts) + cols["masked_lm_positions"][:int(counts.sum())]
            shown, stored = ids[at], cols["masked_lm_ids"][:len(at)]
            original = ids.copy()
            original[at] = stored
            masked += len(at)
            as_mask += int(np.count_nonzero(shown == special["mask"]))
            as_same += int(np.count_nonzero(shown == stored))
        all_lengths.append(lengths)
        tokens += len(ids)
        unk += int(np.count_nonzero(ids == special["unk"]))
        maskable += int(np.count_nonzero(~np.isin(original, specials)))
        if info["sentence_label_key"]:
            labels.update(dict(enumerate(np.bincount(cols[info["sentence_label_key"]][:n], minlength=2).tolist())))
        ordinal += n
        if limit is not None and ordinal >= limit:
            break
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64)
    n = len(lengths)
    hist_edges = np.linspace(0, seq_len, 9).astype(int)
    hist = np.histogram(lengths, bins=hist_edges)[0].tolist() if n else []
    ones = labels.get(1, 0)
    total_labels = sum(labels.values())
    return {
        "split": split, "objective": info["objective"], "seq_len": seq_len, "samples": n, "tokens": tokens,
        "mean_length": tokens / n if n else 0.0,
        "fill": tokens / (n * seq_len) if n else 0.0, "unk_fraction": unk / tokens if tokens else 0.0,
        "length_histogram": {"edges": hist_edges.tolist(), "counts": hist},
        "masking": {"mode": "dynamic (epoch %d)" % epoch if info["dynamic"] else "static",
                    "rate": masked / maskable if maskable else 0.0, "masked": masked,
                    "as_mask": as_mask / masked if masked else 0.0, "kept": as_same / masked if masked else 0.0,
                    "random": (masked - as_mask - as_same) / masked if masked else 0.0},
        "sentence_labels": ({"key": info["sentence_label_key"], "ones": ones, "total": total_labels,
                             "fraction_ones": ones / total_labels if total_labels else 0.0,
                             "ci95": 1.96 * math.sqrt(0.25 / total_labels) if total_labels else 0.0}
                            if total_labels else None),
        "manifest_totals": manifest["splits"][split],
    }


def format_stats(s: dict) -> str:
    lines = [f"split {s['split']}: {s['samples']:,} samples, {s['tokens']:,} tokens, [UNK] {100 * s['unk_fraction']:.2f}%",
             f"{s['objective']} at seq_len {s['seq_len']}: {s['mean_length']:.1f} tokens per instance, fill "
             f"{100 * s['fill']:.1f}% (real tokens / (samples x seq_len))"]
    h = s["length_histogram"]
    if h["counts"]:
        lines.append("length histogram:")
        peak = max(h["counts"]) or 1
        for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
            lines.append(f"  {lo:>5}-{hi:<5} {c:>9,} {'#' * round(40 * c / peak)}")
    m = s["masking"]
    lines.append(f"masking ({m['mode']}): {100 * m['rate']:.2f}% of maskable tokens, {m['masked']:,} positions: "
                 f"{100 * m['as_mask']:.1f}% [MASK], {100 * m['random']:.1f}% random, {100 * m['kept']:.1f}% kept")
    lab = s["sentence_labels"]
    if lab:
        lines.append(f"{lab['key']}: {100 * lab['fraction_ones']:.2f}% label 1 ({lab['ones']:,} of {lab['total']:,}; "
                     f"a fair coin gives 50 +- {100 * lab['ci95']:.2f}%)")
    return "\n".join(lines)


def render_samples(out_dir, n: int = 5, split: str = "train", epoch: int = 0) -> str:
    """Samples decoded to word pieces: [MASK:orig] masked, {rand>orig} replaced, <orig> kept.  A byte-level
    BPE piece is shown as its text (``Ġ`` for the space before a word, ``\ufffd`` for part of a character)."""
    from data_prep.vocab import read_tokenizer, tokenizer_model

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    info = split_info(manifest, split)
    tok = read_tokenizer(out_dir / manifest["tokenizer"]["dir"])
    label_words = {"nsp_label": {0: "B follows A", 1: "B is random"}, "sop_label": {0: "in order", 1: "swapped"}}
    piece_text = _bpe_piece_text(tok) if tokenizer_model(tok) == "BPE" else tok.id_to_token
    out = []
    for ordinal, (where, _, key, raw) in enumerate(iter_split_samples(out_dir, manifest, split, n)):
        ex = example_from_sample(raw, info, seed=manifest["seed"], epoch=epoch, index=ordinal, where=where)
        original = np.array(ex["input_ids"])
        original[ex["masked_lm_positions"]] = ex["masked_lm_labels"]
        marks = dict(zip(ex["masked_lm_positions"].tolist(), ex["masked_lm_labels"].tolist()))
        pieces = []
        for i, (shown, orig) in enumerate(zip(ex["input_ids"].tolist(), original.tolist())):
            word = piece_text(orig)
            if i in marks:
                if shown == info["special_ids"]["mask"]:
                    word = f"[MASK:{word}]"
                elif shown != orig:
                    word = f"{{{piece_text(shown)}>{word}}}"
                else:
                    word = f"<{word}>"
            pieces.append(word)
        head = f"{key}  {len(original)} tokens, {len(marks)} masked"
        if "sentence_label" in ex:
            head += f", {info['sentence_label_key']}={ex['sentence_label']} " \
                    f"({label_words[info['sentence_label_key']][ex['sentence_label']]})"
        out.append(head + "\n  " + " ".join(pieces))
    return "\n\n".join(out)


def _bpe_piece_text(tok):
    """id -> the text of a byte-level BPE token (its bytes decoded), the space before a word shown as Ġ."""
    from data_prep.vocab import SPECIAL_ROLES

    def text(token_id: int) -> str:
        token = tok.id_to_token(token_id)
        if token in SPECIAL_ROLES["BPE"]:
            return token
        decoded = tok.decoder.decode([token])
        return BPE_WORD_START + decoded[1:] if decoded.startswith(" ") else decoded
    return text


def stats_json(s: dict) -> str:
    return json.dumps(s, indent=2)


__all__ = ["verify_dir", "collect_stats", "format_stats", "render_samples", "stats_json", "SPLITS"]
