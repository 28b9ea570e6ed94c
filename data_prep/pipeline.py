"""Orchestration: documents -> work units -> shards on N worker processes, resumable, node-sliced.

Determinism whatever the worker count: the main process reads, cleans and de-duplicates the
corpus in its fixed global order and cuts it into work units of ``text_per_shard_mb`` of text per
split (a document's split is a hash of its text and the seed).  Unit k of a split becomes shard k,
built by whichever worker is free from nothing but the unit and the settings.  Node slices
(``num_nodes``/``node_rank``) partition the same units by ordinal; ``merge`` joins their manifests.
When ``text_per_shard_mb`` is not given, the unit size is picked from the input's size alone
(``pick_unit_mb``: enough units to spread a small corpus over workers), so the shards still do not
depend on ``workers`` or the number of nodes.

Resume: a unit's shard is claimed in ``progress/`` before it is built, and gets its record there
once the tar is renamed into place.  A rerun rebuilds a unit's shard unless its record has the same
settings fingerprint and unit digest and the tar is there with the recorded size; a record of these
settings but other documents means another corpus, refused unless ``overwrite``.  ``--out`` is
locked for the run, and only files data_prep can show it wrote are replaced (see manifest.py).
Memory: the dedup table plus at most ``2 x workers`` units in flight.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Iterator

from data_prep.builder import (ShardSettings, WorkUnit, build_shard, cache_tokenizer, init_pool_worker,
                              init_worker)
from data_prep.clean import clean_documents
from data_prep.compression import CODEC_MAGIC
from data_prep.config import PrepConfig
from data_prep.errors import ErrorPolicy, PrepError
from data_prep.fsutil import atomic_write_json, canonical_json, locked_dir, sha256_text
from data_prep.manifest import (TOKENIZER_SUBDIR, assemble_manifest, claim, finished_record,
                                is_own_name, merge_node_manifests, node_manifest_name, prepare_out_dir,
                                record_path, remove_out_dir_temps, remove_stale_shards,
                                settings_fingerprint)
from data_prep.readers import expand_inputs, iter_documents
from data_prep.shards import MANIFEST, SPLITS
from data_prep.vocab import INFO_FILE, read_tokenizer, save_tokenizer_dir, tokenizer_info

__all__ = ["build_shards", "prepare_vocab", "run_all", "merge_node_manifests", "iter_work_units", "split_of"]

MB = 1_000_000
SHARDS_SUBDIR = "shards"  # of ``run``'s output directory
# Picking text_per_shard_mb from the input's size: at least MIN_TRAIN_UNITS train units (work for 16
# workers or nodes), within UNIT_MB_RANGE (smaller units make smaller shards, which compress worse:
# a shard's chunks want thousands of samples; 1 MB of text gives ~2,000 at seq 128).  Not from the
# worker count: shards are the same whatever ``workers`` and nodes (and merge relies on it).
MIN_TRAIN_UNITS = 16
UNIT_MB_RANGE = (1.0, 4.0)
COMPRESSED_RATIO = 3  # a compressed input counts as this many times its size of text (gzip of text: ~3)


def is_output(cfg: PrepConfig, out_dir: Path):
    """Whether a (resolved) file is one a stage writing ``out_dir`` (or ``run``) writes: never input."""
    dirs = [Path(out_dir)] + ([Path(cfg.out) / TOKENIZER_SUBDIR, Path(cfg.out) / SHARDS_SUBDIR] if cfg.out else [])
    dirs = [d.resolve() for d in dirs]
    return lambda path: any(path.is_relative_to(d) and is_own_name(path.relative_to(d)) for d in dirs)


def input_files(cfg: PrepConfig, out_dir: Path) -> list[Path]:
    if not cfg.input.paths:
        raise PrepError("no input: give --input FILES... (or input.paths in the config)")
    return expand_inputs(cfg.input.paths, is_output(cfg, out_dir))


def cleaned_documents(cfg: PrepConfig, policy: ErrorPolicy, counts: Counter, paths: list[Path]):
    counts["input_files"] = len(paths)
    return clean_documents(iter_documents(paths, cfg.input, policy), cfg.clean, counts)


def input_mb(paths: list[Path]) -> float:
    """An estimate of the MB of text in ``paths``: their sizes, a compressed file's COMPRESSED_RATIO
    times (an unreadable file counts 0: the readers report it)."""
    total = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(8)
            compressed = any(head.startswith(magic) for magic, _ in CODEC_MAGIC)
            total += os.fstat(f.fileno()).st_size * (COMPRESSED_RATIO if compressed else 1)
    return total / MB


def pick_unit_mb(text_mb: float, val_fraction: float) -> float:
    """text_per_shard_mb cutting ``text_mb`` of text into MIN_TRAIN_UNITS train units, within
    UNIT_MB_RANGE (two decimals)."""
    low, high = UNIT_MB_RANGE
    return round(min(max(text_mb * (1 - val_fraction) / MIN_TRAIN_UNITS, low), high), 2)


def unit_mb(cfg: PrepConfig, paths: list[Path]) -> tuple[float, str]:
    """(text_per_shard_mb of this run, why): as given, else ``pick_unit_mb`` for the input."""
    if cfg.shards.text_per_shard_mb is not None:
        return cfg.shards.text_per_shard_mb, "given"
    text_mb = input_mb(paths)
    return pick_unit_mb(text_mb, cfg.shards.val_fraction), f"picked for {text_mb:,.1f} MB of input"


def split_key(seed: int) -> bytes:
    return hashlib.blake2b(b"data_prep split %d" % seed, digest_size=16).digest()


def split_of(digest: bytes, key: bytes, val_fraction: float) -> str:
    """train or val for a document: a keyed hash of its text hash (``key = split_key(seed)``)."""
    if val_fraction <= 0:
        return "train"
    draw = hashlib.blake2b(digest, key=key, digest_size=8).digest()
    return "val" if int.from_bytes(draw, "little") < val_fraction * 2.0 ** 64 else "train"


def iter_work_units(docs: Iterable, seed: int, val_fraction: float, unit_chars: int) -> Iterator[WorkUnit]:
    """Cut the document stream into units of about ``unit_chars`` characters per split."""
    texts = {s: [] for s in SPLITS}
    chars = {s: 0 for s in SPLITS}
    hashers = {s: hashlib.sha256() for s in SPLITS}
    index = {s: 0 for s in SPLITS}
    ordinal = 0

    def emit(split):
        nonlocal ordinal
        unit = WorkUnit(split, index[split], ordinal, texts[split], hashers[split].hexdigest(), chars[split])
        index[split] += 1
        ordinal += 1
        texts[split], chars[split], hashers[split] = [], 0, hashlib.sha256()
        return unit

    key = split_key(seed)
    for doc in docs:
        split = split_of(doc.digest, key, val_fraction)
        texts[split].append(doc.text)
        chars[split] += len(doc.text)
        hashers[split].update(doc.digest)
        if chars[split] >= unit_chars:
            yield emit(split)
    for split in SPLITS:
        if texts[split]:
            yield emit(split)


def shard_settings(cfg: PrepConfig, out_dir: Path, info) -> ShardSettings:
    s = cfg.shards
    return ShardSettings(
        out_dir=str(out_dir), tokenizer_dir=str(out_dir / TOKENIZER_SUBDIR), seq_len=s.seq_len,
        objective=s.objective, masking=s.masking, whole_word_mask=s.whole_word_mask, dupe_factor=s.dupe_factor,
        max_predictions=s.max_predictions, masked_lm_prob=s.masked_lm_prob, short_seq_prob=s.short_seq_prob,
        seed=cfg.seed, vocab_size=info.vocab_size, token_dtype=info.token_dtype, pad_id=info.pad_id,
        unk_id=info.unk_id, cls_id=info.cls_id,
        sep_id=info.sep_id, mask_id=info.mask_id, special_ids=info.special_ids, tokenizer_model=info.model)


class Progress:
    """A tqdm bar of documents read (docs/s) with tokens/s of finished shards on a terminal; off one (a
    SLURM log file, a pipe), a plain line on stderr as shards finish, at most one each ``interval_s``."""

    interval_s = 30.0

    def __init__(self, enabled: bool, desc: str):
        self.start = time.time()
        self.tokens = 0
        self.shards = 0
        self.bar = None
        self.desc, self.lines, self.last_line = desc, enabled and not sys.stderr.isatty(), self.start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # imported only when shown: it costs ~0.1 s of start-up

            self.bar = tqdm(desc=desc, unit=" docs", mininterval=0.5, dynamic_ncols=True)

    def docs(self, iterable):
        if self.bar is None:
            yield from iterable
            return
        for doc in iterable:
            self.bar.update(1)
            yield doc

    def shard_done(self, record: dict) -> None:
        self.tokens += record["tokens"]
        self.shards += 1
        now = time.time()
        rate = self.tokens / max(1e-9, now - self.start)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.shards} shards, {rate:,.0f} tokens/s", refresh=False)
        elif self.lines and now - self.last_line >= self.interval_s:
            self.last_line = now
            print(f"{self.desc}: {self.shards} shard(s) built, {self.tokens:,} tokens, {rate:,.0f} tokens/s, "
                  f"{now - self.start:.0f} s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _run_units(units: Iterable[WorkUnit], settings: ShardSettings, cfg: PrepConfig, out_dir: Path,
               fingerprint: str, overwrite: bool, progress: Progress, stats: Counter, tokenizer) -> list[dict]:
    """Build the shards of this node's units (skipping finished ones); records of all its units."""
    records: list[dict] = []

    def done(record: dict) -> None:
        stats["peak_worker_rss_mb"] = max(stats["peak_worker_rss_mb"], record.pop("_peak_rss_mb", 0))
        record["fingerprint"] = fingerprint
        # Not fsynced: the shard itself was; a record lost in a crash only means a rebuild.
        atomic_write_json(record_path(out_dir, record["name"]), record, durable=False)
        records.append(record)
        stats["shards_built"] += 1
        progress.shard_done(record)

    def todo() -> Iterator[WorkUnit]:
        for unit in units:
            stats["units_total"] += 1
            stats[f"units_{unit.split}"] = max(stats[f"units_{unit.split}"], unit.index + 1)
            if unit.ordinal % cfg.num_nodes != cfg.node_rank:
                continue
            record = finished_record(out_dir, unit, fingerprint, overwrite)
            if record is not None:
                records.append(record)
                stats["shards_skipped"] += 1
                continue
            claim(out_dir, unit, fingerprint)
            yield unit

    if cfg.workers <= 1:
        init_worker()
        cache_tokenizer(settings.tokenizer_dir, tokenizer)
        for unit in todo():
            done(build_shard(unit, settings))
        return records
    import multiprocessing

    others = set(multiprocessing.active_children())
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_pool_worker, initargs=(settings, os.getpid())) as pool, \
            deferred_stops() as stops:
        pending = set()
        try:
            for unit in todo():
                while len(pending) >= 2 * cfg.workers:  # back-pressure: bounded units in flight
                    finished, pending = wait_some(pending, stops)
                    for f in finished:
                        done(f.result())
                pending.add(pool.submit(build_shard, unit, settings))
            while pending:
                finished, pending = wait_some(pending, stops)
                for f in finished:
                    done(f.result())
        except BaseException:
            # Stopped (an error, a signal): the shards in progress are not waited for, nor committed.
            # The pool then fails the pending futures itself (cancelling them first would make
            # Python 3.11's pool manager crash on them and leave its queue feeder blocked forever).
            for worker in set(multiprocessing.active_children()) - others:
                worker.kill()
            raise
    return records


class _Stops:
    """The stop signals noted by ``deferred_stops``; ``check`` delivers the first one."""

    def __init__(self, previous: dict):
        self.previous = previous
        self.noted: list[int] = []

    def note(self, signum, frame) -> None:
        self.noted.append(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def check(self) -> None:
        if self.noted:
            self.restore()
            signal.raise_signal(self.noted[0])


@contextlib.contextmanager
def deferred_stops() -> Iterator[_Stops]:
    """SIGTERM and Ctrl-C are noted while the main process waits on its pool, and delivered (to the
    handlers they had before) at ``check()`` or on leaving: an exception raised by a handler inside
    ``concurrent.futures.wait`` can leave its waiter's lock half-released ("release unlocked lock")
    and turn a clean stop into a traceback."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if handler not in (signal.SIG_IGN, None):
                previous[signum] = handler
    stops = _Stops(previous)
    for signum in previous:
        signal.signal(signum, stops.note)
    try:
        yield stops
    finally:
        stops.restore()
    stops.check()


def wait_some(pending: set, stops: _Stops, poll_s: float = 0.2) -> tuple[set, set]:
    """``wait(pending, FIRST_COMPLETED)`` that delivers a noted stop signal within ``poll_s``."""
    while True:
        finished, pending = wait(pending, timeout=poll_s, return_when=FIRST_COMPLETED)
        stops.check()
        if finished:
            return finished, pending


def build_shards(cfg: PrepConfig, tokenizer_source, out_dir, *, overwrite: bool = False) -> dict:
    """The shards stage: returns the manifest written (or, on a multi-node slice, the node manifest).

    ``cfg.vocab.lowercase`` only matters when ``tokenizer_source`` is a bare vocab.txt (see read_tokenizer).
    """
    out_dir = Path(out_dir)
    tokenizer = read_tokenizer(Path(tokenizer_source), cfg.vocab.lowercase)
    with out_dir_locks(out_dir, cfg):
        return _build_shards(cfg, tokenizer, out_dir, overwrite)


@contextlib.contextmanager
def out_dir_locks(out_dir: Path, cfg: PrepConfig):
    """One run at a time in ``out_dir``; the node slices of a multi-node run share it, one run a slice."""
    with locked_dir(out_dir, shared=cfg.num_nodes > 1):
        if cfg.num_nodes == 1:
            yield
            return
        with locked_dir(out_dir, f".data_prep.node-{cfg.node_rank:05d}-of-{cfg.num_nodes:05d}.lock"):
            yield


def _build_shards(cfg: PrepConfig, tokenizer, out_dir: Path, overwrite: bool) -> dict:
    info = tokenizer_info(tokenizer)
    fingerprint = settings_fingerprint(cfg, info)
    prepare_out_dir(out_dir, tokenizer, info, fingerprint, overwrite)
    settings = shard_settings(cfg, out_dir.resolve(), info)
    paths = input_files(cfg, out_dir)
    size, why = unit_mb(cfg, paths)
    if why != "given":
        print(f"data_prep shards: work units of {size:g} MB of text ({why}; --text-per-shard-mb sets it)",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, shards=dataclasses.replace(cfg.shards, text_per_shard_mb=size))
    policy = ErrorPolicy(cfg.on_error)
    counts: Counter = Counter()
    stats: Counter = Counter()
    started = time.time()
    progress = Progress(cfg.progress, f"shards -> {out_dir}")
    docs = cleaned_documents(cfg, policy, counts, paths)
    try:
        units = iter_work_units(progress.docs(docs), cfg.seed, cfg.shards.val_fraction, max(1, int(size * MB)))
        records = _run_units(units, settings, cfg, out_dir, fingerprint, overwrite, progress, stats, tokenizer)
    finally:
        docs.close()  # now, not at interpreter shutdown (where closing the readers fails)
        progress.close()
    counts.update({f"skipped_{k}": v for k, v in policy.counts.items()})
    manifest = assemble_manifest(cfg, info, fingerprint, settings, records, counts, stats)
    if cfg.num_nodes == 1:
        remove_stale_shards(out_dir, manifest["units"], overwrite)
        atomic_write_json(out_dir / MANIFEST, manifest)
        remove_out_dir_temps(out_dir)  # left by killed or failed runs (no other run writes here now)
    else:
        manifest["node"] = {"rank": cfg.node_rank, "num_nodes": cfg.num_nodes}
        atomic_write_json(out_dir / node_manifest_name(cfg.node_rank, cfg.num_nodes), manifest)
    print_summary(out_dir, manifest, stats, time.time() - started)
    return manifest


def print_summary(out_dir: Path, manifest: dict, stats: Counter, elapsed: float) -> None:
    c = manifest["corpus"]
    mb = c.get("chars_read", 0) / MB
    lines = [f"data_prep shards: {out_dir}",
             f"  input     {c.get('input_files', 0)} files, {c.get('docs_read', 0):,} documents, "
             f"{mb:,.1f} M characters"]
    dropped = {k: v for k, v in c.items() if k.startswith(("dropped_", "skipped_")) and v}
    lines.append("  dropped   " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "nothing"))
    for split, t in manifest["splits"].items():
        lines.append(f"  {split:<9} {t['shards']} shards, {t['samples']:,} samples, {t['tokens']:,} tokens")
    lines.append(f"  shards    {stats['shards_built']} built, {stats['shards_skipped']} already done (resumed)")
    built_tokens = sum(s["tokens"] for s in manifest["shards"])
    lines.append(f"  time      {elapsed:,.1f} s: {c.get('docs_read', 0) / max(elapsed, 1e-9):,.0f} documents/s, "
                 f"{built_tokens / max(elapsed, 1e-9):,.0f} tokens/s, {mb / max(elapsed, 1e-9):.2f} M chars/s")
    import resource

    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"  memory    peak RSS {main_rss:,.0f} MB main process, {stats['peak_worker_rss_mb']:,.0f} MB "
                 f"largest worker (the main process is the worker when workers=1)")
    print("\n".join(lines), file=sys.stderr)


def _training_texts(cfg: PrepConfig, policy: ErrorPolicy, counts: Counter, out_dir: Path):
    limit = int(cfg.vocab.max_text_mb * MB) if cfg.vocab.max_text_mb else None
    used = 0
    for doc in cleaned_documents(cfg, policy, counts, input_files(cfg, out_dir)):
        if limit is not None and used >= limit:
            return
        used += len(doc.text)
        yield doc.text


def vocab_fingerprint(cfg: PrepConfig, out_dir: Path) -> str:
    inputs = expand_inputs(cfg.input.paths, is_output(cfg, out_dir))
    files = [(str(p.resolve()), p.stat().st_size) for p in inputs]
    v = cfg.vocab
    settings = {"files": files, "input": vars(cfg.input) | {"paths": None}, "clean": vars(cfg.clean),
                "vocab_size": v.vocab_size, "lowercase": v.lowercase is not False, "min_frequency": v.min_frequency,
                "max_text_mb": v.max_text_mb}
    if v.model != "wordpiece":  # only then: the fingerprints of WordPiece runs stay what they were
        settings.update(model=v.model, lowercase=False)
    return sha256_text(canonical_json(settings))


def prepare_vocab(cfg: PrepConfig, out_dir) -> dict:
    """The vocab stage: train (or import ``vocab.tokenizer``) into ``out_dir``; skipped when done."""
    from data_prep.vocab import train_bpe, train_wordpiece

    out_dir = Path(out_dir)
    info_path = out_dir / INFO_FILE
    previous = json.loads(info_path.read_text()) if info_path.is_file() else None
    started = time.time()
    if cfg.vocab.tokenizer:
        tok = read_tokenizer(Path(cfg.vocab.tokenizer), cfg.vocab.lowercase)
        if previous and previous.get("sha256") == tokenizer_info(tok).sha256:
            print(f"data_prep vocab: {out_dir} already holds this tokenizer; skipped", file=sys.stderr)
            return previous
        save_tokenizer_dir(tok, out_dir, {"source": str(cfg.vocab.tokenizer)})
    else:
        fingerprint = vocab_fingerprint(cfg, out_dir)
        if previous and previous.get("training_fingerprint") == fingerprint:
            stored = read_tokenizer(out_dir)
            if tokenizer_info(stored).sha256 != previous.get("sha256"):  # a hash cached by an older version
                keep = ("training_fingerprint", "requested_vocab_size", "corpus")
                save_tokenizer_dir(stored, out_dir, {k: v for k, v in previous.items() if k in keep})
                previous = json.loads(info_path.read_text())
            print(f"data_prep vocab: {out_dir} was trained on these inputs and settings; skipped", file=sys.stderr)
            return previous
        policy, counts = ErrorPolicy(cfg.on_error), Counter()
        quiet = ErrorPolicy(cfg.on_error, max_warnings=0)  # the second pass meets the same problems
        passes = iter([lambda: _training_texts(cfg, policy, counts, out_dir),
                       lambda: _training_texts(cfg, quiet, Counter(), out_dir)])
        if cfg.vocab.model == "bpe":
            tok = train_bpe(lambda: next(passes)(), cfg.vocab.vocab_size, cfg.vocab.min_frequency)
        else:
            lowercase = True if cfg.vocab.lowercase is None else cfg.vocab.lowercase
            tok = train_wordpiece(lambda: next(passes)(), cfg.vocab.vocab_size, lowercase,
                                  cfg.vocab.min_frequency)
        counts.update({f"skipped_{k}": v for k, v in policy.counts.items()})
        save_tokenizer_dir(tok, out_dir, {"training_fingerprint": fingerprint, "requested_vocab_size":
                                          cfg.vocab.vocab_size, "corpus": dict(sorted(counts.items()))})
    info = json.loads(info_path.read_text())
    print(f"data_prep vocab: {out_dir}: {info['vocab_size']:,} {info['model']} tokens, "
          f"{'uncased' if info['lowercase'] else 'cased'}, sha256 {info['sha256'][:12]}..., "
          f"{time.time() - started:.1f} s", file=sys.stderr)
    return info


def run_all(cfg: PrepConfig, *, overwrite: bool = False) -> dict:
    """``run --config``: vocab into <out>/tokenizer, then shards into <out>/shards."""
    if not cfg.out:
        raise PrepError("no output directory: set out in the config or give --out")
    out = Path(cfg.out)
    with out_dir_locks(out, cfg):
        prepare_vocab(cfg, out / TOKENIZER_SUBDIR)
        return build_shards(cfg, out / TOKENIZER_SUBDIR, out / SHARDS_SUBDIR, overwrite=overwrite)
