"""One work unit -> one shard: tokenize, build instances for each duplicate, shuffle, mask, write.

Runs inside a worker process (or inline with one worker).  Everything random is drawn from
generators seeded by (seed, stream, split, unit index[, duplicate]), never by worker or time, so
a shard's bytes depend only on its unit's documents and the settings.
"""
from __future__ import annotations

import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.encode import encode_documents
from data_prep.errors import PrepError, write_error
from data_prep.instances import create_instances, fill_row, instance_rng
from data_prep.masking import continuation_table, mask_batch, masking_config
from data_prep.procs import die_with_parent, parent_alive
from data_prep.shards import (CHUNK_SAMPLES, SENTENCE_LABEL_KEYS, SPLIT_CODES, ZSTD_LEVEL, ShardWriter, column_dtype,
                              sample_columns, shard_name)

# Independent random streams of a unit (the second entry of every seed list).
STREAM_INSTANCES, STREAM_SHUFFLE, STREAM_STATIC_MASK = 1, 2, 3


@dataclass(frozen=True)
class ShardSettings:
    out_dir: str
    tokenizer_dir: str
    seq_len: int
    objective: str
    masking: str
    whole_word_mask: bool
    dupe_factor: int
    max_predictions: int
    masked_lm_prob: float
    short_seq_prob: float
    seed: int
    vocab_size: int
    token_dtype: str
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    tokenizer_model: str = "WordPiece"  # BPE: RoBERTa's framing and word starts (Ġ)

    @property
    def double_sep(self) -> bool:
        """Two separators between segments (RoBERTa; not between the documents of a blocks row)."""
        return self.tokenizer_model == "BPE" and self.objective != "blocks"

    @property
    def label_key(self) -> str | None:
        return SENTENCE_LABEL_KEYS.get(self.objective)

    def columns(self) -> list[str]:
        """The columns of every chunk, in the order they are written."""
        return sample_columns(self.objective, self.masking, self.whole_word_mask)


@dataclass
class WorkUnit:
    split: str
    index: int  # shard index within the split
    ordinal: int  # position among all units (train and val), for node slices
    texts: list[str]
    digest: str  # hash of the unit's document hashes: a rerun reuses a shard only if it matches
    chars: int


_cache: dict = {}


def cache_tokenizer(tokenizer_dir: str, tokenizer) -> None:
    """Hand a loaded tokenizer to inline (workers=1) builds, so they do not read it again."""
    _cache.clear()
    _cache[tokenizer_dir] = [tokenizer, None]


def _tokenizer_and_table(settings: ShardSettings):
    """(tokenizer, is_continuation table or None), loaded once per process."""
    key = settings.tokenizer_dir
    if key not in _cache:
        from data_prep.vocab import read_tokenizer

        cache_tokenizer(key, read_tokenizer(Path(key), validate=False))  # the run's own checked copy
    entry = _cache[key]
    if settings.whole_word_mask and entry[1] is None:
        entry[1] = continuation_table(entry[0].get_vocab(), settings.tokenizer_model)
    return entry[0], entry[1]


def init_worker(settings: ShardSettings | None = None) -> None:
    """Worker process setup: one tokenizer thread per process, so N workers use N cores; with
    ``settings``, load the tokenizer now, while the main process is still reading the first unit."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if settings is not None:
        _tokenizer_and_table(settings)


def init_pool_worker(settings: ShardSettings, parent_pid: int) -> None:
    """Setup of a worker of the main process ``parent_pid``: stop signals are left to the main
    process (it stops the workers), and the kernel kills the worker when the main process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)
    init_worker(settings)


def build_shard(unit: WorkUnit, settings: ShardSettings) -> dict:
    """Write ``<out>/<split>-<index>.tar`` for ``unit``; returns its manifest record."""
    tok, is_continuation = _tokenizer_and_table(settings)
    in_text_specials = tuple(i for i in settings.special_ids if i != settings.unk_id)  # [UNK] is text
    encoded = encode_documents(unit.texts, tok, max_segment_tokens=settings.seq_len - 3,
                               is_continuation=is_continuation, drop_ids=in_text_specials)
    split_code = SPLIT_CODES[unit.split]
    instances = []
    for dupe in range(settings.dupe_factor):
        rng = instance_rng(settings.seed, STREAM_INSTANCES, split_code, unit.index, dupe)
        instances.extend(create_instances(encoded, settings.objective, settings.seq_len,
                                          settings.short_seq_prob, rng, settings.double_sep))
    order = np.random.default_rng([settings.seed, STREAM_SHUFFLE, split_code, unit.index]).permutation(
        len(instances))
    counts = _write_samples(unit, settings, encoded, [instances[i] for i in order.tolist()])
    counts.update(name=shard_name(unit.split, unit.index), split=unit.split, index=unit.index,
                  unit_sha256=unit.digest, documents=len(unit.texts), sentences=encoded.num_sentences,
                  text_chars=unit.chars)
    # Not part of the manifest (it varies run to run): the pipeline pops it for its summary.
    counts["_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return counts


BATCH_ROWS = 4096  # samples materialized (and statically masked) at a time


def _write_samples(unit: WorkUnit, settings: ShardSettings, encoded, instances) -> dict:
    """Write and commit the shard; an OSError (e.g. a full disk) becomes one line naming it."""
    path = Path(settings.out_dir) / shard_name(unit.split, unit.index)
    try:
        writer = ShardWriter(path, unit.split, unit.index,
                             {c: column_dtype(c, settings.token_dtype) for c in settings.columns()},
                             CHUNK_SAMPLES, ZSTD_LEVEL)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        counts = _add_samples(writer, unit, settings, encoded, instances)
        if not parent_alive():  # never commit a shard for a run that is gone
            raise PrepError(f"{path}: not committed: the data_prep main process is gone")
        record = writer.commit()
    except OSError as err:
        writer.abort()
        raise write_error(path, err) from None
    except BaseException:
        writer.abort()
        raise
    record.update(counts)
    return record


def _add_samples(writer: ShardWriter, unit: WorkUnit, settings: ShardSettings, encoded, instances) -> dict:
    static = settings.masking == "static"
    wwm = settings.whole_word_mask
    masking = masking_config(settings.vocab_size, settings.mask_id, settings.special_ids, settings.masked_lm_prob,
                             settings.max_predictions) if static else None
    mask_rng = np.random.default_rng([settings.seed, STREAM_STATIC_MASK, SPLIT_CODES[unit.split], unit.index])
    label_key = settings.label_key
    tokens = masked = label_ones = 0
    for lo in range(0, len(instances), BATCH_ROWS):
        batch = instances[lo: lo + BATCH_ROWS]
        ids = np.full((len(batch), settings.seq_len), settings.pad_id, dtype=np.int32)
        starts = np.zeros(ids.shape, dtype=np.uint8) if wwm else None
        lengths = [fill_row(inst, encoded.tokens, settings.cls_id, settings.sep_id, ids[r],
                            encoded.word_starts, starts[r] if wwm else None, settings.double_sep)
                   for r, inst in enumerate(batch)]
        lengths = np.asarray(lengths, dtype=np.int64)
        if wwm and settings.objective == "blocks":
            starts[:, 1] = 1  # a row may start mid-word: its first token starts a word
        real = np.arange(settings.seq_len) < lengths[:, None]  # the tokens of each row, row-major
        columns = {"lengths": lengths}
        if static:  # one vectorized call per batch (the loader masks one sample at a time)
            result = mask_batch(ids, mask_rng, masking, starts)
            rows, cols = np.nonzero(result.chosen)  # row-major: each row's positions ascending
            columns.update(input_ids=result.input_ids[real], masked_lm_counts=np.bincount(rows, minlength=len(batch)),
                           masked_lm_positions=cols, masked_lm_ids=ids[rows, cols])
            masked += len(rows)
        else:
            columns["input_ids"] = ids[real]
            if wwm:
                columns["word_starts"] = starts[real]
        if label_key:
            values = [inst.label for inst in batch]
            columns[label_key] = np.asarray(values)
            label_ones += sum(values)
        writer.add(columns, len(batch))
        tokens += int(lengths.sum())
    return dict(tokens=tokens, masked_positions=masked, sentence_label_ones=label_ones)
