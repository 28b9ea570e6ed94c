"""Synthetic-but-realistic pretraining batches, the same instances for every system.

An *instance* is what data_prep's NSP stage makes: [CLS] A [SEP] B [SEP], a next-sentence
label, and 15% of its content tokens masked (80% [MASK], 10% random, 10% kept; at most
``max_predictions``).  Lengths follow BERT's create_instances_from_document: with probability
``short_seq_prob`` (0.1) the target length is uniform in [2, max]; otherwise the pair is filled
to the maximum, except at a document's end, where the last chunk is shorter (``tail_prob`` of the
long instances, uniform in [max/2, max]).  The mean fill is ~92% of seq_len at 128 and 512.
Token ids follow a power law over the vocabulary (frequent ids small), like real text.

Three renderings of one list of instances:

* :func:`render_padded` -- ours: one instance per row padded to seq_len, ``masked_lm_positions``
  / ``masked_lm_labels`` [B, P] (P = max_predictions), as ``pretrain.data.collate`` produces;
* :func:`render_dense_labels` -- the HF peer: the same rows, ``labels`` [B, S] (-100 where not
  masked) and ``next_sentence_label``, as HF's DataCollatorForLanguageModeling produces;
* :func:`pack` -- ours packed: several instances per row (first fit), ``segment_ids`` 1..k per
  instance (0 = padding) so attention is block-diagonal and positions restart per instance.

With packing the sentence head sees only each row's first instance (the model pools position 0);
its cost (B x H^2) is negligible either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_prep.masking import IGNORE_INDEX
from pretrain.data import collate

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
FIRST_REGULAR_ID = 5


@dataclass
class Instance:
    input_ids: np.ndarray          # [n] with [CLS] A [SEP] B [SEP], masked tokens replaced
    token_type_ids: np.ndarray     # [n] 0 for [CLS] A [SEP], 1 for B [SEP]
    masked_positions: np.ndarray   # [k] sorted, inside the content
    masked_labels: np.ndarray      # [k] the original ids
    sentence_label: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def example(self) -> dict:
        """This instance as a training example (the input of ``pretrain.data.collate``)."""
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids,
                "masked_lm_positions": self.masked_positions, "masked_lm_labels": self.masked_labels,
                "sentence_label": self.sentence_label}


def default_max_predictions(seq_len: int) -> int:
    """BERT's recipe: 20 at 128, 80 at 512 (ceil of 15%, rounded to the recipes' values)."""
    return {128: 20, 512: 80}.get(seq_len, max(1, int(round(0.15 * seq_len + 0.5))))


def instance_length(rng: np.random.Generator, seq_len: int, short_seq_prob: float = 0.1,
                    tail_prob: float = 0.1) -> int:
    """Total tokens of one NSP instance (content + [CLS] + 2 [SEP])."""
    max_content = seq_len - 3
    if rng.random() < short_seq_prob:
        content = int(rng.integers(2, max_content + 1))
    elif rng.random() < tail_prob:
        content = int(rng.integers(max_content // 2, max_content + 1))
    else:
        content = max_content
    return content + 3


def read_shard_lengths(shard_dir: str, seq_len: int, limit: int = 50_000) -> np.ndarray:
    """Instance lengths (tokens) of up to ``limit`` samples of a data_prep shard directory's train split."""
    import glob
    import io
    import os
    import tarfile
    lengths: list[int] = []
    paths = sorted(glob.glob(os.path.join(shard_dir, "train-*.tar")))
    if not paths:
        raise ValueError(f"{shard_dir}: no train-*.tar shards")
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".input_ids.npy"):
                    lengths.append(len(np.load(io.BytesIO(tar.extractfile(member).read()))))
                    if len(lengths) >= limit:
                        break
        if len(lengths) >= limit:
            break
    out = np.minimum(np.array(lengths, dtype=np.int64), seq_len)
    if out.size == 0 or out.min() < 5:
        raise ValueError(f"{shard_dir}: no usable samples (need [CLS] A [SEP] B [SEP] with >= 2 content tokens)")
    return out


def draw_instance(rng: np.random.Generator, seq_len: int, vocab_size: int, max_predictions: int,
                  mlm_probability: float = 0.15, short_seq_prob: float = 0.1,
                  lengths: np.ndarray | None = None) -> Instance:
    """One instance; its length from BERT's rule, or drawn from ``lengths`` (real shards)."""
    n = instance_length(rng, seq_len, short_seq_prob) if lengths is None else int(rng.choice(lengths))
    content = n - 3
    len_a = int(rng.integers(1, content)) if content >= 2 else 1
    regular = vocab_size - FIRST_REGULAR_ID
    tokens = FIRST_REGULAR_ID + np.minimum((regular * rng.random(content) ** 3).astype(np.int64), regular - 1)
    ids = np.concatenate([[CLS], tokens[:len_a], [SEP], tokens[len_a:], [SEP]]).astype(np.int64)
    types = np.zeros(n, dtype=np.int64)
    types[len_a + 2:] = 1
    content_positions = np.concatenate([np.arange(1, len_a + 1), np.arange(len_a + 2, n - 1)])
    k = min(max_predictions, max(1, int(round(mlm_probability * content))))
    positions = np.sort(rng.choice(content_positions, size=k, replace=False))
    labels = ids[positions].copy()
    action = rng.random(k)
    ids[positions[action < 0.8]] = MASK
    randomized = positions[(action >= 0.8) & (action < 0.9)]
    ids[randomized] = rng.integers(FIRST_REGULAR_ID, vocab_size, size=len(randomized))
    return Instance(ids, types, positions.astype(np.int64), labels, int(rng.random() < 0.5))


def draw_instances(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int,
                   max_predictions: int, lengths: np.ndarray | None = None) -> list[Instance]:
    return [draw_instance(rng, seq_len, vocab_size, max_predictions, lengths=lengths) for _ in range(count)]


def render_padded(instances: list[Instance], seq_len: int, max_predictions: int) -> dict:
    """Our padded batch (one instance per row, padded to seq_len): ``pretrain.data.collate``'s."""
    return collate([inst.example() for inst in instances], PAD, seq_len, max_predictions)


def dense_labels(padded: dict) -> torch.Tensor:
    """[B, S] labels, -100 except at the masked positions (HF's layout)."""
    labels = torch.full_like(padded["input_ids"], IGNORE_INDEX)
    keep = padded["masked_lm_labels"] != IGNORE_INDEX
    rows = torch.arange(labels.size(0))[:, None].expand_as(keep)
    labels[rows[keep], padded["masked_lm_positions"][keep]] = padded["masked_lm_labels"][keep]
    return labels


def render_dense_labels(padded: dict) -> dict:
    """The HF peer's batch for the same rows: dense MLM labels and ``next_sentence_label``."""
    return dict(input_ids=padded["input_ids"], token_type_ids=padded["token_type_ids"],
                attention_mask=padded["attention_mask"], labels=dense_labels(padded),
                next_sentence_label=padded["sentence_labels"])


class Packer:
    """First-fit packing of an instance stream into batches of ``rows`` rows of ``seq_len``.

    A batch is closed after ``lookahead`` instances in a row fit no row; those wait, in order,
    at the head of the next batch (a packing loader carries them over too, so the length
    distribution is not skewed towards short instances).
    """

    def __init__(self, draw, rows: int, seq_len: int, lookahead: int = 8):
        self.draw, self.rows, self.seq_len, self.lookahead = draw, rows, seq_len, lookahead
        self.pending: list[Instance] = []

    def next_rows(self) -> list[list[Instance]]:
        rows: list[list[Instance]] = [[] for _ in range(self.rows)]
        room = [self.seq_len] * self.rows
        waiting, self.pending, misses = self.pending, [], 0
        while misses < self.lookahead:
            inst = waiting.pop(0) if waiting else self.draw()
            target = next((r for r in range(self.rows) if room[r] >= len(inst)), None)
            if target is None:
                self.pending.append(inst)
                misses += 1
                continue
            rows[target].append(inst)
            room[target] -= len(inst)
        self.pending.extend(waiting)
        return rows


def render_packed(rows: list[list[Instance]], seq_len: int, max_predictions_per_row: int) -> dict:
    """Our packed batch: ``segment_ids`` 1..k per instance (0 = padding), positions offset per row."""
    b = len(rows)
    input_ids = np.full((b, seq_len), PAD, dtype=np.int64)
    token_type_ids = np.zeros((b, seq_len), dtype=np.int64)
    segment_ids = np.zeros((b, seq_len), dtype=np.int64)
    positions = np.zeros((b, max_predictions_per_row), dtype=np.int64)
    labels = np.full((b, max_predictions_per_row), IGNORE_INDEX, dtype=np.int64)
    sentence = np.zeros(b, dtype=np.int64)
    for i, row in enumerate(rows):
        start, k = 0, 0
        for j, inst in enumerate(row):
            n, m = len(inst), len(inst.masked_positions)
            input_ids[i, start:start + n] = inst.input_ids
            token_type_ids[i, start:start + n] = inst.token_type_ids
            segment_ids[i, start:start + n] = j + 1
            if k + m > max_predictions_per_row:
                raise ValueError(f"row {i} has more than {max_predictions_per_row} masked positions")
            positions[i, k:k + m], labels[i, k:k + m] = inst.masked_positions + start, inst.masked_labels
            start, k = start + n, k + m
        sentence[i] = row[0].sentence_label if row else 0
    batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, segment_ids=segment_ids,
                 masked_lm_positions=positions, masked_lm_labels=labels, sentence_labels=sentence)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


@dataclass
class BatchSet:
    """Pre-drawn batches of one (seq_len, micro batch) and their token counts.

    ``padded[i]`` and ``peer[i]`` hold the same instances; ``packed[i]`` (when built) holds other
    instances of the same distribution, packed into the same number of rows.
    """
    seq_len: int
    micro_batch: int
    max_predictions: int
    padded: list[dict]
    peer: list[dict]
    packed: list[dict]
    real_tokens: list[int]          # per padded batch
    packed_real_tokens: list[int]   # per packed batch
    packed_instances: list[int]     # instances per packed batch

    def mean_real_tokens(self, packed: bool = False) -> float:
        values = self.packed_real_tokens if packed else self.real_tokens
        return float(np.mean(values))

    def mean_sequences(self, packed: bool = False) -> float:
        return float(np.mean(self.packed_instances)) if packed else float(self.micro_batch)


def make_batches(seq_len: int, micro_batch: int, vocab_size: int, *, count: int = 4, seed: int = 0,
                 max_predictions: int | None = None, packed: bool = False,
                 lengths: np.ndarray | None = None) -> BatchSet:
    """``count`` distinct batches (timed steps rotate through them, so no step reuses a cache).

    ``lengths``: draw instance lengths from these (e.g. :func:`read_shard_lengths`) instead of
    BERT's rule, whose long-document assumption fills ~92% of the slots; corpora of short
    documents fill far fewer (the bundled demo corpus: 59% at seq 128)."""
    max_predictions = max_predictions or default_max_predictions(seq_len)
    rng = np.random.default_rng(seed)
    padded, peer, real = [], [], []
    for _ in range(count):
        instances = draw_instances(rng, micro_batch, seq_len, vocab_size, max_predictions, lengths)
        batch = render_padded(instances, seq_len, max_predictions)
        padded.append(batch)
        peer.append(render_dense_labels(batch))
        real.append(int(batch["attention_mask"].sum()))
    packed_batches, packed_real, packed_count = [], [], []
    if packed:
        packer = Packer(lambda: draw_instance(rng, seq_len, vocab_size, max_predictions, lengths=lengths),
                        micro_batch, seq_len)
        all_rows = [packer.next_rows() for _ in range(count)]
        # One fixed width for every batch (fixed shapes: no recompilation under torch.compile).
        width = max(sum(len(inst.masked_positions) for inst in row) for rows in all_rows for row in rows)
        width = -(-width // 8) * 8
        for rows in all_rows:
            batch = render_packed(rows, seq_len, width)
            packed_batches.append(batch)
            packed_real.append(int((batch["segment_ids"] > 0).sum()))
            packed_count.append(sum(len(row) for row in rows))
    return BatchSet(seq_len, micro_batch, max_predictions, padded, peer, packed_batches, real, packed_real,
                    packed_count)
