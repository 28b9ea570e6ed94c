"""Everything a fine-tuning run reads before it trains: the task's files, the tokenizer, the labels,
the features; and the order of the training batches.

:func:`read_task` (the files, the task type, the labels) and :func:`encode_task` (the tokenizer, the
features; after the model is loaded, whose head needs the labels) read and check all of it before
anything is written, so bad input (a missing file, a wrong column, a label not in the list, a
checkpoint that does not exist) is one :class:`FinetuneInputError` line naming the file or key and
what was expected.  Every rank prepares
the same data (a pure function of the files and the config).

Training batches (:func:`epoch_batches`): each epoch, a permutation of the training features seeded by
(seed, epoch); with ``training.length_grouped``, windows of ``length_group_batches`` global batches of
that order are sorted by length, longest first, cut into global batches, and the batches' order is
shuffled by the same generator.  An epoch's last global batch is filled up with the epoch's first
features, so every batch is full and every feature is seen once an epoch.  A global batch is cut into
``accum x world_size`` micro-batches; rank r takes micro-batches ``r*accum ... r*accum + accum - 1``
(so one rank with accumulation sees the same micro-batches as several ranks without it).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from pretrain.finetune.config import DEFAULT_MAX_LENGTH, ConfigError, FinetuneConfig, check_metric, column
from pretrain.finetune.tasks import (FORMATS, TaskDataError, infer_task, label_list, read_classification, read_conll,
                                     read_squad)


class FinetuneInputError(ValueError):
    """Bad input of a fine-tuning run, in one line naming the file or the key."""


@dataclass
class TaskData:
    """The resolved task, its examples and (after :func:`encode_task`) its features."""
    task_type: str                       # classification | regression | token | qa
    metric: str                          # eval.metric resolved: the one that picks the best model
    labels: Optional[list[str]]          # class names / tags in id order (None: regression, qa)
    train_examples: list                 # ClassificationExample / TokenSentence / QAExample, file order
    dev_examples: list
    version_2: bool = False              # qa: SQuAD v2.0
    notes: list[str] = field(default_factory=list)   # what was inferred, for the log
    tokenizer_dir: str = ""
    pad_id: int = 0
    train_features: list = field(default_factory=list)
    dev_features: list = field(default_factory=list)

    @property
    def head_task(self) -> str:
        return {"classification": "sequence", "regression": "sequence"}.get(self.task_type, self.task_type)

    @property
    def problem_type(self) -> Optional[str]:
        return {"classification": "single_label_classification", "regression": "regression"}.get(self.task_type)

    @property
    def num_labels(self) -> Optional[int]:
        return 1 if self.task_type == "regression" else (len(self.labels) if self.labels else None)


def read_task(cfg: FinetuneConfig) -> TaskData:
    """The task's files read, its type and labels resolved (see the module doc)."""
    t = cfg.task
    for key in ("train", "dev"):
        path = Path(getattr(t, key))
        if not path.is_file():
            raise FinetuneInputError(f"task.{key}: {path} " + ("is a directory; expected a file" if path.is_dir()
                                                               else "does not exist"))
    try:
        if t.type == "token":
            data = _token_task(cfg)
        elif t.type == "qa":
            data = _qa_task(cfg)
        else:
            data = _sequence_task(cfg)
    except TaskDataError as err:
        raise FinetuneInputError(str(err)) from None
    for key, examples in (("train", data.train_examples), ("dev", data.dev_examples)):
        if not examples:
            raise FinetuneInputError(f"task.{key}: {getattr(t, key)} holds no examples")
    try:
        data.metric = check_metric(cfg, data.task_type)
    except ConfigError as err:
        raise FinetuneInputError(err.problems[0]) from None
    return data


def encode_task(data: TaskData, cfg: FinetuneConfig, tokenizer_dir: Optional[str], max_positions: int,
                vocab_size: int) -> TaskData:
    """``data`` with its features, encoded with ``tokenizer_dir`` (the checkpoint's; model.tokenizer
    overrides it); ``max_positions`` (the model's longest sequence, pretrain.config.max_seq_len), ``vocab_size``:
    the model's, for the checks."""
    from pretrain.finetune.features import encode_classification, encode_squad, encode_tokens
    t = cfg.task
    max_length = t.max_length or min(DEFAULT_MAX_LENGTH, max_positions)
    if max_length > max_positions:
        raise FinetuneInputError(f"task.max_length: {max_length} exceeds the model's longest sequence "
                                 f"({max_positions} tokens, from its max_position_embeddings)")
    if data.task_type == "qa" and cfg.qa.max_query_length + 3 >= max_length:
        raise FinetuneInputError(f"qa.max_query_length: {cfg.qa.max_query_length} + 3 must be below the "
                                 f"max_length of {max_length}: a window needs room for the context")
    tokenizer, data.tokenizer_dir = _tokenizer(cfg.model.tokenizer or tokenizer_dir, vocab_size)
    data.pad_id = tokenizer.token_to_id("[PAD]") or 0
    label_to_id = {name: i for i, name in enumerate(data.labels)} if data.labels else None
    try:
        for split in ("train", "dev"):
            examples = getattr(data, f"{split}_examples")
            if data.task_type == "token":
                features = encode_tokens(tokenizer, examples, max_length, label_to_id,
                                         cfg.token.label_all_subtokens and split == "train")
            elif data.task_type == "qa":
                features = encode_squad(tokenizer, examples, max_length, cfg.qa.doc_stride, cfg.qa.max_query_length)
            else:
                features = encode_classification(tokenizer, examples, max_length, label_to_id)
            setattr(data, f"{split}_features", features)
    except ValueError as err:        # TaskDataError: a label not in the list; a tokenizer without [CLS]/[SEP]
        raise FinetuneInputError(str(err)) from None
    return data


def _tokenizer(path: Optional[str], vocab_size: int):
    from data_prep.errors import PrepError
    from data_prep.vocab import read_tokenizer
    if not path:
        raise FinetuneInputError("model.tokenizer: the checkpoint records no tokenizer; give its directory "
                                 "(model.tokenizer=DIR)")
    try:
        tokenizer = read_tokenizer(Path(path))
    except PrepError as err:
        raise FinetuneInputError(f"model.tokenizer: {err}") from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise FinetuneInputError(f"model.tokenizer: {path} has {tokenizer.get_vocab_size()} tokens, more than the "
                                 f"model's vocab_size ({vocab_size}): not the checkpoint's tokenizer")
    return tokenizer, str(path)


def _has_column(path: Path, cfg: FinetuneConfig, name: str) -> bool:
    """Whether a classification file's header (or first JSON object) has column ``name``."""
    fmt = cfg.task.format or FORMATS.get(path.suffix.lower())
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if fmt == "jsonl":
        try:
            record = json.loads(first)
        except ValueError:
            return True          # the reader reports the bad line
        return not isinstance(record, dict) or name in record
    if not cfg.task.header:
        return False             # columns are indices: no name to find
    delimiter = "\t" if fmt == "tsv" else ","
    return name in next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])


def _read_sequence_file(cfg: FinetuneConfig, path: Path):
    t = cfg.task
    pair = column(t.text_pair_column)
    if t.text_pair_column == "text_pair" and not _has_column(path, cfg, "text_pair"):
        pair = None              # the default pair column is optional
    return read_classification(path, format=t.format, text_column=column(t.text_column), text_pair_column=pair,
                               label_column=column(t.label_column), header=t.header)


def _sequence_task(cfg: FinetuneConfig) -> TaskData:
    t = cfg.task
    train, dev = _read_sequence_file(cfg, Path(t.train)), _read_sequence_file(cfg, Path(t.dev))
    notes, task_type, labels = [], t.type, None
    if task_type == "auto":
        task_type = infer_task([ex.label for ex in train])
        notes.append(f"task.type=auto: {task_type}, from the labels of {t.train}")
    if task_type == "classification":
        labels = list(t.labels) if t.labels else label_list([ex.label for ex in train + dev])
        if len(labels) < 2:
            raise FinetuneInputError(f"task.labels: classification needs at least 2 labels, got {labels} "
                                     f"(from {'task.labels' if t.labels else t.train + ' and ' + t.dev})")
    return TaskData(task_type, "", labels, train, dev, notes=notes)


def _token_task(cfg: FinetuneConfig) -> TaskData:
    t, k = cfg.task, cfg.token
    train = read_conll(t.train, token_column=k.token_column, tag_column=k.tag_column)
    dev = read_conll(t.dev, token_column=k.token_column, tag_column=k.tag_column)
    labels = list(t.labels) if t.labels else label_list(tag for s in train + dev for tag in s.tags)
    return TaskData("token", "", labels, train, dev)


def _qa_task(cfg: FinetuneConfig) -> TaskData:
    t, q = cfg.task, cfg.qa
    train, dev = read_squad(t.train), read_squad(t.dev)
    version_2 = q.version_2 if q.version_2 is not None else any(ex.is_impossible for ex in train + dev)
    return TaskData("qa", "", None, train, dev, version_2=version_2)


# --------------------------------------------------------------------------------------------
# The order of the training batches
# --------------------------------------------------------------------------------------------
def steps_per_epoch(num_features: int, global_batch: int) -> int:
    return max(1, math.ceil(num_features / global_batch))


def epoch_batches(lengths: Sequence[int], global_batch: int, seed: int, epoch: int, length_grouped: bool = False,
                  group_batches: int = 50) -> list[list[int]]:
    """The global batches (feature indices) of one epoch (see the module doc)."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist()
    steps = steps_per_epoch(n, global_batch)
    order += (order * (global_batch // max(n, 1) + 1))[:steps * global_batch - n]   # fill the last batch
    if length_grouped:
        window = global_batch * group_batches
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    batches = [order[s * global_batch:(s + 1) * global_batch] for s in range(steps)]
    if length_grouped:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def rank_micro_batches(batch: list[int], micro: int, accum: int, rank: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch."""
    return [batch[(rank * accum + a) * micro:(rank * accum + a + 1) * micro] for a in range(accum)]


def micro_batch_stream(features: Sequence[Any], pad_id: int, global_batch: int, micro: int, accum: int, rank: int,
                       seed: int, length_grouped: bool, group_batches: int, first_batch: int = 0
                       ) -> Iterator[tuple[int, dict]]:
    """(epoch, collated micro-batch) of this rank, epoch after epoch, without end, from global batch
    ``first_batch`` on (counted over the epochs: a run resumed after k optimizer steps starts at k)."""
    from pretrain.finetune.features import collate
    lengths = [len(f.input_ids) for f in features]
    epoch, skip = divmod(first_batch, steps_per_epoch(len(features), global_batch))
    while True:
        for batch in epoch_batches(lengths, global_batch, seed, epoch, length_grouped, group_batches)[skip:]:
            for part in rank_micro_batches(batch, micro, accum, rank):
                yield epoch, collate([features[i] for i in part], pad_id)
        epoch, skip = epoch + 1, 0
