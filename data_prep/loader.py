"""Stored sample -> training example: the bridge the training loader calls for every sample.

``example_from_sample`` takes one sample as read from a shard (member extension -> decoded value,
e.g. ``{"input_ids.npy": array, "nsp_label.cls": "1"}``; plain field names work too) and returns
unpadded numpy arrays: ``input_ids`` (masked), ``token_type_ids`` (uint8: 0 through the first [SEP],
then 1, for pairs; all 0 for full-sentences), ``masked_lm_positions``,
``masked_lm_labels`` and, for nsp/sop shards, ``sentence_label``.  Static shards carry their masks;
dynamic ones are masked here with ``data_prep.masking.mask_sample`` seeded by (seed, epoch, index).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from data_prep.instances import token_type_ids
from data_prep.masking import MaskingConfig, mask_sample

SENTENCE_LABEL_FIELDS = ("nsp_label", "sop_label")


@lru_cache(maxsize=16)
def masking_config(vocab_size: int, mask_id: int, special_ids: tuple, masked_lm_prob: float,
                   max_predictions: int) -> MaskingConfig:
    return MaskingConfig(vocab_size=vocab_size, mask_id=mask_id, special_ids=special_ids,
                         masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)


def _field(sample: dict, name: str, ext: str):
    if f"{name}.{ext}" in sample:
        return sample[f"{name}.{ext}"]
    return sample.get(name)


def example_from_sample(sample: dict, split, *, seed: int, epoch: int, index: int) -> dict:
    """One example.  ``split`` needs: dynamic, whole_word, mlm_probability, max_predictions,
    vocab_size and special (dict with pad, unk, cls, sep, mask ids), e.g. from ``shards.split_info``
    (where they are called dynamic, whole_word, mlm_probability, max_predictions, vocab_size,
    special_ids).  ``index`` is any stable integer naming the sample (the loader uses its ordinal
    in the split); with ``seed`` and ``epoch`` it fixes the dynamic mask."""
    get = split.get if isinstance(split, dict) else (lambda k: getattr(split, k))
    special = get("special") if not isinstance(split, dict) else split["special_ids"]
    ids = np.asarray(_field(sample, "input_ids", "npy"))
    label = next((_field(sample, name, "cls") for name in SENTENCE_LABEL_FIELDS
                  if _field(sample, name, "cls") is not None), None)
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
