"""Stored sample -> training example: the bridge the training loader calls for every sample.

``example_from_sample`` takes one sample as read from a shard (``shards.DecodedShard.sample``, or
``shards.wds_samples`` under stock webdataset: field name -> value, e.g. ``{"input_ids": array,
"nsp_label": 1}``) and its split's ``shards.split_info``, and returns
unpadded numpy arrays: ``input_ids`` (masked), ``token_type_ids`` (uint8: 0 through the first [SEP],
then 1, for pairs; all 0 for full-sentences), ``masked_lm_positions``,
``masked_lm_labels`` and, for nsp/sop shards, ``sentence_label``.  Static shards carry their masks;
dynamic ones are masked here with ``data_prep.masking.mask_sample`` seeded by (seed, epoch, index).
A sample is checked first (``check_sample``): a missing field or a value out of range is a PrepError
naming the sample, never an IndexError deep in the masking.
"""
from __future__ import annotations

import numpy as np

from data_prep.errors import PrepError
from data_prep.instances import token_type_ids
from data_prep.masking import IGNORE_INDEX, mask_sample, masking_config
from data_prep.shards import SENTENCE_LABEL_KEYS

SENTENCE_LABEL_FIELDS = tuple(SENTENCE_LABEL_KEYS.values())


def _range_problem(name: str, values: np.ndarray, lo: int, hi: int) -> str | None:
    """Why an array is not 1-D integers in [lo, hi), or None.  Min and max first (vectorised): the
    first bad value is looked for only when there is one."""
    if values.ndim != 1 or values.dtype.kind not in "iu":
        return f"{name}: got a {values.dtype} array of shape {values.shape}, expected 1-D integers"
    if len(values) and (values.min() < lo or values.max() >= hi):
        at = int(np.flatnonzero((values < lo) | (values >= hi))[0])
        return f"{name}: {values[at]} at position {at} is outside [{lo}, {hi})"
    return None


def _sample_problem(sample: dict, ids, label, split: dict) -> str | None:
    """The first problem of a stored sample against its split's format, or None."""
    if ids is None:
        return "input_ids: missing"
    ids = np.asarray(ids)
    problem = _range_problem("input_ids", ids, 0, int(split["vocab_size"]))
    if problem or not 1 <= len(ids) <= int(split["seq_len"]):
        return problem or f"input_ids: {len(ids)} tokens, expected 1 to seq_len ({split['seq_len']})"
    if split["has_sentence_labels"] and label is None:
        return f"sentence label ({' or '.join(SENTENCE_LABEL_FIELDS)}): missing"
    if label is not None and not _is_binary_label(label):
        return f"sentence label: got {label!r}, expected 0 or 1"
    if split["dynamic"]:
        starts = sample.get("word_starts") if split["whole_word"] else None
        if split["whole_word"] and (starts is None or np.shape(starts) != ids.shape):
            return f"word_starts: shape {np.shape(starts)}, expected {ids.shape} (one flag per token)"
        return None
    positions, labels = sample.get("masked_lm_positions"), sample.get("masked_lm_ids")
    if positions is None or labels is None:
        return f"{'masked_lm_positions' if positions is None else 'masked_lm_ids'}: missing (static shards carry masks)"
    positions, labels = np.asarray(positions), np.asarray(labels)
    if positions.shape != labels.shape:
        return f"masked_lm_positions {positions.shape} and masked_lm_ids {labels.shape}: shapes differ"
    return _range_problem("masked_lm_positions", positions, 0, len(ids)) or \
        _range_problem("masked_lm_ids", labels[labels != IGNORE_INDEX], 0, int(split["vocab_size"]))


def _check(sample: dict, ids, label, split: dict, where: str) -> None:
    problem = _sample_problem(sample, ids, label, split)
    if problem:
        raise PrepError(f"{where}: {problem}")


def check_sample(sample: dict, split: dict, where: str = "sample") -> None:
    """PrepError("<where>: <problem>") unless the sample has its split's fields, with token ids and
    labels below vocab_size, 1..seq_len tokens, mask positions inside the sample and 0/1 labels.
    ``sample`` and ``split`` as for ``example_from_sample``."""
    _check(sample, sample.get("input_ids"), _sentence_label(sample), split, where)


def _is_binary_label(label) -> bool:
    try:
        return int(label) in (0, 1)
    except (TypeError, ValueError):
        return False


def _sentence_label(sample: dict):
    return next((label for label in (sample.get(name) for name in SENTENCE_LABEL_FIELDS) if label is not None), None)


def example_from_sample(sample: dict, split: dict, *, seed: int, epoch: int, index: int, where: str = "sample") -> dict:
    """One example.  ``sample``: one sample as read from a shard (see above); ``split``: its split's
    ``shards.split_info`` (pretrain's loader sets its run's mlm_probability and max_predictions in it).
    ``index`` is any stable integer naming the sample (the loader uses its ordinal in the split); with
    ``seed`` and ``epoch`` it fixes the dynamic mask.  ``where`` names the sample in errors."""
    ids, label = sample.get("input_ids"), _sentence_label(sample)
    if ids is not None:
        ids = np.asarray(ids)
    _check(sample, ids, label, split, where)   # as check_sample, with the fields looked up once
    special = split["special_ids"]
    example = {"token_type_ids": token_type_ids(ids, int(special["sep"]), pair=label is not None)}
    if split["dynamic"]:
        config = masking_config(int(split["vocab_size"]), int(special["mask"]), tuple(int(v) for v in special.values()),
                                float(split["mlm_probability"]), int(split["max_predictions"]))
        starts = sample.get("word_starts") if split["whole_word"] else None
        masked = mask_sample(ids, config, seed=seed, epoch=epoch, sample_index=index, word_starts=starts)
        example.update(input_ids=masked.input_ids, masked_lm_positions=masked.masked_lm_positions,
                       masked_lm_labels=masked.masked_lm_ids.astype(np.int64))
    else:
        example.update(input_ids=ids,
                       masked_lm_positions=np.asarray(sample.get("masked_lm_positions"), dtype=np.int64),
                       masked_lm_labels=np.asarray(sample.get("masked_lm_ids"), dtype=np.int64))
    if label is not None:
        example["sentence_label"] = int(label)
    return example
