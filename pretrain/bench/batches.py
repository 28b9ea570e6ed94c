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
* packed (``make_batches(..., packed=True)``) -- ours as the training loop packs (``data.packing``):
  the same instances laid into fewer rows by ``pretrain.packing.collate_packed``, with the train
  loader's defaults (``data.max_instances_per_row``, ``data.pad_to_multiple_of``).  A packed step
  holds the micro batch's instances in a number of rows, and a row width, that vary from batch to
  batch; the sentence head reads every instance's [CLS] (``cls_positions``), and on CUDA with sdpa
  attention the model runs jagged attention over ``cu_seqlens``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_prep.masking import IGNORE_INDEX
from pretrain.config import DataConfig
from pretrain.data import collate
from pretrain.packing import collate_packed

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
    """Instance lengths (tokens, clipped to ``seq_len``) of the first ``limit`` samples of a data_prep
    shard directory's train split, read through ``data_prep.shards`` (the format's one owner)."""
    from data_prep.errors import PrepError
    from data_prep.shards import read_entry, read_manifest, split_info
    from data_prep.shards.store import open_store

    try:
        shards = split_info(read_manifest(shard_dir), "train")["shards"]
        if not shards:
            raise ValueError(f"{shard_dir}: no train shards in its manifest")
        store, lengths, count = open_store(shard_dir), [], 0
        for entry in shards:
            lengths.append(np.asarray(read_entry(store, entry).columns["lengths"], dtype=np.int64)[:limit - count])
            count += len(lengths[-1])
            if count >= limit:
                break
    except PrepError as err:
        raise ValueError(str(err)) from None
    out = np.minimum(np.concatenate(lengths), seq_len)
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


@dataclass
class BatchSet:
    """Pre-drawn batches of one (seq_len, micro batch) and their token counts.

    ``padded[i]``, ``peer[i]`` and ``packed[i]`` (when built) hold the same ``micro_batch`` instances:
    ``padded[i]`` and ``peer[i]`` one a row (``micro_batch`` rows of seq_len), ``packed[i]`` in
    ``packed_rows[i]`` rows of ``packed_slots[i] / packed_rows[i]`` slots (both vary by batch).
    """
    seq_len: int
    micro_batch: int
    max_predictions: int
    padded: list[dict]
    peer: list[dict]
    packed: list[dict]
    real_tokens: list[int]          # per batch: the instances' tokens (padded[i] and packed[i] alike)
    packed_rows: list[int]          # rows of each packed batch
    packed_slots: list[int]         # rows x width of each packed batch (padding included)

    def mean_real_tokens(self) -> float:
        return float(np.mean(self.real_tokens))

    def mean_rows(self, packed: bool = False) -> float:
        return float(np.mean(self.packed_rows)) if packed else float(self.micro_batch)

    def mean_slots(self, packed: bool = False) -> float:
        return float(np.mean(self.packed_slots)) if packed else float(self.micro_batch * self.seq_len)


def make_batches(seq_len: int, micro_batch: int, vocab_size: int, *, count: int = 4, seed: int = 0,
                 max_predictions: int | None = None, packed: bool = False,
                 lengths: np.ndarray | None = None) -> BatchSet:
    """``count`` distinct batches (timed steps rotate through them, so no step reuses a cache).

    ``packed``: also ``packed[i]``, padded[i]'s instances as the training loop packs them.
    ``lengths``: draw instance lengths from these (e.g. :func:`read_shard_lengths`) instead of
    BERT's rule, whose long-document assumption fills ~92% of the slots; corpora of short
    documents fill far fewer (the bundled demo corpus: 59% at seq 128)."""
    max_predictions = max_predictions or default_max_predictions(seq_len)
    data = DataConfig()   # the packer's settings: the train loader's defaults (pretrain.data._Collate)
    rng = np.random.default_rng(seed)
    padded, peer, real, packed_batches, rows, slots = [], [], [], [], [], []
    for _ in range(count):
        instances = draw_instances(rng, micro_batch, seq_len, vocab_size, max_predictions, lengths)
        batch = render_padded(instances, seq_len, max_predictions)
        padded.append(batch)
        peer.append(render_dense_labels(batch))
        real.append(int(batch["attention_mask"].sum()))
        if packed:
            packed_batches.append(collate_packed([inst.example() for inst in instances], PAD, seq_len,
                                                 max_predictions, data.max_instances_per_row,
                                                 data.pad_to_multiple_of))
            rows.append(packed_batches[-1]["input_ids"].size(0))
            slots.append(packed_batches[-1]["input_ids"].numel())
    return BatchSet(seq_len, micro_batch, max_predictions, padded, peer, packed_batches, real, rows, slots)
