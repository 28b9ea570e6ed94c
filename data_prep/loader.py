"""Stored sample -> training example: the bridge the training loader calls for every sample.

``example_from_sample`` takes one sample as read from a shard (member extension -> decoded value,
e.g. ``{"input_ids.npy": array, "nsp_label.cls": "1"}``; plain field names work too) and returns
unpadded numpy arrays: ``input_ids`` (masked), ``token_type_ids`` (uint8: 0 through the first [SEP],
then 1, for pairs; all 0 for full-sentences), ``masked_lm_positions``,
``masked_lm_labels`` and, for nsp/sop shards, ``sentence_label``.  Static shards carry their masks;
dynamic ones are masked here with ``data_prep.masking.mask_sample`` seeded by (seed, epoch, index).
A sample is checked first (``check_sample``): a missing field or a value out of range is a PrepError
naming the sample, never an IndexError deep in the masking.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from data_prep.errors import PrepError
from data_prep.instances import token_type_ids
from data_prep.masking import IGNORE_INDEX, MaskingConfig, mask_sample
from data_prep.shards import SENTENCE_LABEL_KEYS

SENTENCE_LABEL_FIELDS = tuple(SENTENCE_LABEL_KEYS.values())


@lru_cache(maxsize=16)
def masking_config(vocab_size: int, mask_id: int, special_ids: tuple, masked_lm_prob: float,
                   max_predictions: int) -> MaskingConfig:
    return MaskingConfig(vocab_size=vocab_size, mask_id=mask_id, special_ids=special_ids,
                         masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)


def _field(sample: dict, name: str, ext: str):
    if f"{name}.{ext}" in sample:
        return sample[f"{name}.{ext}"]
    return sample.get(name)


def _range_problem(name: str, values: np.ndarray, lo: int, hi: int) -> str | None:
    """Why an array is not 1-D integers in [lo, hi), or None.  Min and max first (vectorised): the
    first bad value is looked for only when there is one."""
    if values.ndim != 1 or values.dtype.kind not in "iu":
        return f"{name}: got a {values.dtype} array of shape {values.shape}, expected 1-D integers"
    if len(values) and (values.min() < lo or values.max() >= hi):
        at = int(np.flatnonzero((values < lo) | (values >= hi))[0])
        return f"{name}: {values[at]} at position {at} is outside [{lo}, {hi})"
    return None


def _sample_problem(sample: dict, ids, label, get) -> str | None:
    """The first problem of a stored sample against its split's format, or None."""
    if ids is None:
        return "input_ids: missing"
    ids = np.asarray(ids)
    problem = _range_problem("input_ids", ids, 0, int(get("vocab_size")))
    if problem or not 1 <= len(ids) <= int(get("seq_len")):
        return problem or f"input_ids: {len(ids)} tokens, expected 1 to seq_len ({get('seq_len')})"
    if get("has_sentence_labels") and label is None:
        return f"sentence label ({' or '.join(f + '.cls' for f in SENTENCE_LABEL_FIELDS)}): missing"
    if label is not None and not _is_binary_label(label):
        return f"sentence label: got {label!r}, expected 0 or 1"
    if get("dynamic"):
        starts = _field(sample, "word_starts", "npy") if get("whole_word") else None
        if get("whole_word") and (starts is None or np.shape(starts) != ids.shape):
            return f"word_starts: shape {np.shape(starts)}, expected {ids.shape} (one flag per token)"
        return None
    positions, labels = _field(sample, "masked_lm_positions", "npy"), _field(sample, "masked_lm_ids", "npy")
    if positions is None or labels is None:
        return f"{'masked_lm_positions' if positions is None else 'masked_lm_ids'}: missing (static shards carry masks)"
    positions, labels = np.asarray(positions), np.asarray(labels)
    if positions.shape != labels.shape:
        return f"masked_lm_positions {positions.shape} and masked_lm_ids {labels.shape}: shapes differ"
    return _range_problem("masked_lm_positions", positions, 0, len(ids)) or \
        _range_problem("masked_lm_ids", labels[labels != IGNORE_INDEX], 0, int(get("vocab_size")))


def _getter(split):
    """``split``'s fields by name, for a dict (``shards.split_info``) or an object (``pretrain.data.Split``)."""
    return split.get if isinstance(split, dict) else (lambda k: getattr(split, k))


def _check(sample: dict, ids, label, get, where: str) -> None:
    problem = _sample_problem(sample, ids, label, get)
    if problem:
        raise PrepError(f"{where}: {problem}")


def check_sample(sample: dict, split, where: str = "sample") -> None:
    """PrepError("<where>: <problem>") unless the sample has its split's fields, with token ids and
    labels below vocab_size, 1..seq_len tokens, mask positions inside the sample and 0/1 labels.
    ``split`` as for ``example_from_sample``."""
    _check(sample, _field(sample, "input_ids", "npy"), _sentence_label(sample), _getter(split), where)


def _is_binary_label(label) -> bool:
    try:
        return int(label) in (0, 1)  # int, or the text of a .cls member (str or bytes)
    except (TypeError, ValueError):
        return False


def _sentence_label(sample: dict):
    for name in SENTENCE_LABEL_FIELDS:
        label = _field(sample, name, "cls")
        if label is not None:
            return label
    return None


def example_from_sample(sample: dict, split, *, seed: int, epoch: int, index: int, where: str = "sample") -> dict:
    """One example.  ``split`` needs: dynamic, whole_word, mlm_probability, max_predictions, seq_len,
    has_sentence_labels, vocab_size and special (dict with pad, unk, cls, sep, mask ids), e.g. from
    ``shards.split_info`` (where the last is called special_ids).  ``index`` is any stable integer
    naming the sample (the loader uses its ordinal in the split); with ``seed`` and ``epoch`` it fixes
    the dynamic mask.  ``where`` names the sample in errors (``check_sample``)."""
    get = _getter(split)
    ids, label = _field(sample, "input_ids", "npy"), _sentence_label(sample)
    if ids is not None:
        ids = np.asarray(ids)
    _check(sample, ids, label, get, where)   # as check_sample, with the fields looked up once
    special = get("special") if not isinstance(split, dict) else split["special_ids"]
    example = {"token_type_ids": token_type_ids(ids, int(special["sep"]), pair=label is not None)}
    if get("dynamic"):
        config = masking_config(int(get("vocab_size")), int(special["mask"]),
                                tuple(sorted(int(v) for v in special.values())),
                                float(get("mlm_probability")), int(get("max_predictions")))
        starts = _field(sample, "word_starts", "npy") if get("whole_word") else None
        masked = mask_sample(ids, config, seed=seed, epoch=epoch, sample_index=index, word_starts=starts)
        example.update(input_ids=masked.input_ids, masked_lm_positions=masked.masked_lm_positions,
                       masked_lm_labels=masked.masked_lm_ids.astype(np.int64))
    else:
        example.update(input_ids=ids,
                       masked_lm_positions=np.asarray(_field(sample, "masked_lm_positions", "npy"), dtype=np.int64),
                       masked_lm_labels=np.asarray(_field(sample, "masked_lm_ids", "npy"), dtype=np.int64))
    if label is not None:
        example["sentence_label"] = int(label)
    return example
