"""Masked-LM masking: the one implementation used by data_prep (static) and the training loader (dynamic).

Numpy only, no tokenizer: the loader calls it per sample.  The recipe is BERT's
(create_pretraining_data.py): choose ``round(masked_lm_prob * n)`` of the ``n`` maskable tokens
(at least 1, at most ``max_predictions``) by visiting whole words in a random order and taking a
word only if it still fits; then each chosen token becomes [MASK] with probability 0.8, a random
token with 0.1, and stays itself with 0.1.  Special tokens (every id in ``special_ids``: [PAD],
[UNK], [CLS], [SEP], [MASK]) are never chosen and never drawn as random replacements.

Whole-word masking: ``word_starts[i]`` is true when token ``i`` begins a word; a word is a start
token plus the continuation tokens after it.  Without ``word_starts`` every token is its own word.
English word starts come from WordPiece (a token not starting with ``##``, ``continuation_table``) or
byte-level BPE (a token starting with ``Ġ``, the mark of a preceding space, or a sentence's first
token); Chinese ones from jieba at prep time, stored in the shards (see docs/data-format.md).

Reproducibility: dynamic masking seeds a fresh generator with ``masking_rng(seed, epoch,
sample_index)``, so a resumed run masks every sample exactly as before.  Static masking draws from
one generator per shard instead (seeded by seed, stream, split and shard index in
``data_prep.builder``), masking the shard's samples in write order with ``mask_batch``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]  # never masked, never used as a random replacement
    masked_lm_prob: float = 0.15
    max_predictions: int = 20
    mask_token_prob: float = 0.8  # chosen token -> [MASK]
    random_token_prob: float = 0.1  # chosen token -> random token (the rest keep their token)

    def __post_init__(self):
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")
        if self.max_predictions < 1:
            raise ValueError(f"max_predictions must be >= 1, got {self.max_predictions}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or \
                self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError("mask_token_prob and random_token_prob must be >= 0 and sum to <= 1")
        if len(set(self.special_ids)) >= self.vocab_size:
            raise ValueError("the vocabulary holds nothing but special tokens")

    @cached_property
    def is_special(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(self.special_ids)] = True
        return table

    @cached_property
    def is_maskable(self) -> np.ndarray:
        return ~self.is_special

    @cached_property
    def replacement_ids(self) -> np.ndarray:
        """The ids a random replacement is drawn from (uniformly): every non-special id."""
        return np.flatnonzero(self.is_maskable)

    @cached_property
    def thresholds(self) -> np.ndarray:
        # A uniform draw below the first is [MASK], below the second a random token, else kept.
        return np.array([self.mask_token_prob, self.mask_token_prob + self.random_token_prob])


@lru_cache(maxsize=16)
def masking_config(vocab_size: int, mask_id: int, special_ids: tuple[int, ...], masked_lm_prob: float,
                   max_predictions: int) -> MaskingConfig:
    """The MaskingConfig of a shard format, made once per process: the loader asks for it per sample, and
    its tables are built on first use."""
    return MaskingConfig(vocab_size=vocab_size, mask_id=mask_id, special_ids=tuple(sorted(set(special_ids))),
                         masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)


class MaskedSample(NamedTuple):
    input_ids: np.ndarray  # copy of the input with the chosen positions replaced (same dtype)
    masked_lm_positions: np.ndarray  # int64 [P], ascending, P <= max_predictions
    masked_lm_ids: np.ndarray  # original ids at those positions (the labels), input dtype [P]


def masking_rng(seed: int, epoch: int, sample_index: int) -> np.random.Generator:
    """The generator of one sample's masking in one epoch: a pure function of the three integers."""
    return np.random.default_rng([int(seed), int(epoch), int(sample_index)])


def _choose_words(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Word indices chosen greedily in a random order, skipping words that no longer fit."""
    order = rng.permutation(len(sizes))
    if budget >= int(sizes.sum()):
        return order
    chosen = []
    rest = order
    while budget > 0:
        rest = rest[sizes[rest] <= budget]  # a word that does not fit now never will
        if len(rest) == 0:
            break
        filled = np.cumsum(sizes[rest])
        k = int(np.searchsorted(filled, budget, side="right"))  # words that fit, in order (>= 1)
        chosen.append(rest[:k])
        budget -= int(filled[k - 1])
        rest = rest[k + 1:]  # the next word overflowed: skip it, as BERT's script does
    return np.concatenate(chosen) if chosen else order[:0]


class MaskedBatch(NamedTuple):
    input_ids: np.ndarray  # (N, L) copy of the input with the chosen positions replaced
    chosen: np.ndarray  # (N, L) bool: the positions to predict


def budgets(num_maskable: np.ndarray, config: MaskingConfig) -> np.ndarray:
    """Tokens to predict per row: ``round(masked_lm_prob * n)`` (half up) of its ``n`` maskable tokens,
    at least 1 and at most ``max_predictions`` (and ``n``); 0 when nothing is maskable."""
    n = np.asarray(num_maskable, dtype=np.int64)
    wanted = np.floor(n * config.masked_lm_prob + 0.5).astype(np.int64)
    return np.where(n > 0, np.minimum(np.minimum(config.max_predictions, np.maximum(1, wanted)), n), 0)


def mask_batch(input_ids: np.ndarray, rng: np.random.Generator, config: MaskingConfig,
               word_starts: np.ndarray | None = None) -> MaskedBatch:
    """Mask every row of a (N, L) id array (rows padded with [PAD], which is special).

    The one masking routine: ``mask_tokens`` is this with N = 1.  Draws, in order: the choice
    (one uniform key per token, the ``budget`` smallest keys among maskable tokens win; with
    ``word_starts``, one word permutation per row instead), then one uniform per chosen token in
    row-major order (below 0.8 [MASK], below 0.9 a random token, else kept), then the random ids.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"mask_batch takes a 2-D (rows, length) array, got shape {ids.shape}")
    maskable = config.is_maskable[ids]
    budget = budgets(maskable.sum(axis=1), config)
    chosen = np.zeros(ids.shape, dtype=bool)
    if word_starts is None:
        keys = rng.random(ids.shape)
        keys[~maskable] = 2.0  # sorts after every maskable token
        order = np.argsort(keys, axis=1, kind="stable")
        rows = np.repeat(np.arange(len(ids)), budget)
        rank = np.arange(rows.size) - np.repeat(np.cumsum(budget) - budget, budget)
        chosen[rows, order[rows, rank]] = True
    else:
        starts_all = np.asarray(word_starts, dtype=bool)
        for i in np.flatnonzero(budget):
            candidates = np.flatnonzero(maskable[i])
            starts = starts_all[i, candidates]
            starts[0] = True
            starts[1:] |= np.diff(candidates) > 1  # a token after a special token starts a word
            word_of = np.cumsum(starts) - 1
            sizes = np.bincount(word_of)
            take = np.zeros(sizes.size, dtype=bool)
            take[_choose_words(sizes, int(budget[i]), rng)] = True
            chosen[i, candidates[take[word_of]]] = True
    rows, cols = np.nonzero(chosen)
    kind = np.searchsorted(config.thresholds, rng.random(rows.size), side="right")
    masked = ids.copy()
    masked[rows[kind == 0], cols[kind == 0]] = config.mask_id
    replace = kind == 1
    if replace.any():
        pool = config.replacement_ids
        masked[rows[replace], cols[replace]] = pool[rng.integers(0, pool.size, int(replace.sum()))]
    return MaskedBatch(masked, chosen)


def mask_tokens(input_ids: np.ndarray, rng: np.random.Generator, config: MaskingConfig,
                word_starts: np.ndarray | None = None) -> MaskedSample:
    """Mask one sample (1-D ids): ``mask_batch`` on a batch of one.  Pure given ``rng``'s state.

    ``word_starts``: optional bool/uint8 array like ``input_ids`` for whole-word masking.
    """
    ids = np.asarray(input_ids)
    starts = None if word_starts is None else np.asarray(word_starts)[None, :]
    batch = mask_batch(ids[None, :], rng, config, starts)
    positions = np.flatnonzero(batch.chosen[0])
    return MaskedSample(batch.input_ids[0], positions, ids[positions])


def mask_sample(input_ids: np.ndarray, config: MaskingConfig, *, seed: int, epoch: int, sample_index: int,
                word_starts: np.ndarray | None = None) -> MaskedSample:
    """Dynamic masking of one stored sample: ``mask_tokens`` with ``masking_rng(seed, epoch, sample_index)``."""
    return mask_tokens(input_ids, masking_rng(seed, epoch, sample_index), config, word_starts)


BPE_WORD_START = "\u0120"  # "Ġ": byte-level BPE's mark of a leading space


def continuation_table(vocab: dict[str, int], model: str = "WordPiece") -> np.ndarray:
    """Bool over the vocabulary: true for a token that starts no word: a WordPiece continuation
    (``##...``), or for ``model="BPE"`` a byte-level token without the ``Ġ`` word-start mark (the
    first token of a sentence starts a word all the same: the encoder flags it)."""
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for token, i in vocab.items():
        if model == "BPE":
            table[i] = not token.startswith(BPE_WORD_START)
        else:
            table[i] = token.startswith("##")
    return table
