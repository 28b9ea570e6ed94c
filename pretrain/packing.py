"""Packed batches: the instances of a micro-batch laid into as few rows as fit (``data.packing``).

Batch semantics (docs/training.md, "Packing"): a micro-batch holds a fixed number of *instances*,
``training.micro_batch_size``, exactly those the unpacked loader would give it, and a variable number
of *rows*.  The global sample order, the sample counter a checkpoint records, the epochs and the LR
schedule are therefore those of unpacked training, and the losses are the unpacked batch's (same
instances, same masked tokens, the same order of the loss terms); only the rows they are computed
on change.  Packing is a pure function of the micro-batch's instances and the settings, so a resume
(with any world size) sees the same rows.

Rows come from first-fit decreasing: instances by length, longest first (ties in batch order), each
into the first row with room for it and fewer than ``max_instances_per_row`` instances.  Every row
is ``width`` slots: the fullest row's length rounded up to ``pad_to_multiple_of``.

A packed batch, for N instances in R rows of width W:

* ``input_ids``, ``token_type_ids`` [R, W]; ``segment_ids`` [R, W]: k >= 1 for the k-th instance
  of the row, 0 for padding: attention is confined to an instance and positions restart at each;
* ``cls_positions`` [N]: where each instance's [CLS] lies in the R*W flattened slots (the sentence
  head reads every instance's);
* ``masked_lm_positions`` [M]: the instances' masked positions one after another (batch order, each
  instance's in its own order, at most ``max_predictions`` each), as indices into the flattened
  slots; ``masked_lm_labels`` [M] their labels.  M is their count rounded up to
  ``pad_to_multiple_of``; the entries past the count point at slot 0 with label -100.  These are the
  unpacked batch's [N, P] labels without its padding entries, in the same order, so the MLM head
  runs on the masked tokens only, not on N x P rows (unpacked, P = max_predictions keeps one shape
  for every batch; a packed batch has no fixed shape to keep).  ``sentence_labels`` [N] are the
  unpacked batch's;
* ``cu_seqlens`` [K+1]: the boundaries of the K runs of one segment id in the flattened slots
  (every instance, and each row's padding), for attention over jagged sequences (no S x S mask).
"""
from __future__ import annotations

import numpy as np
import torch

from data_prep.masking import IGNORE_INDEX


def first_fit_decreasing(lengths, capacity: int, max_per_row: int) -> list[list[int]]:
    """Rows of instance indices: FFD of ``lengths`` (each <= capacity), at most ``max_per_row`` a row."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"instance {i} has {n} tokens, more than a row's {capacity}")
        r = next((r for r in range(len(rows)) if room[r] >= n and len(rows[r]) < max_per_row), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def layout(lengths, seq_len: int, max_instances_per_row: int, pad_to_multiple_of: int = 1) -> tuple[list[list[int]], int]:
    """(rows of instance indices, row width) of a packed micro-batch of instances of these lengths."""
    rows = first_fit_decreasing(lengths, seq_len, max_instances_per_row)
    fullest = max(sum(int(lengths[i]) for i in row) for row in rows)
    return rows, min(-(-fullest // pad_to_multiple_of) * pad_to_multiple_of, seq_len)


def collate_packed(examples: list[dict], pad_id: int, seq_len: int, max_predictions: int,
                   max_instances_per_row: int, pad_to_multiple_of: int = 1) -> dict:
    """The examples of one micro-batch as a packed batch of int64 tensors (see the module docstring)."""
    lengths = [len(e["input_ids"]) for e in examples]
    rows, width = layout(lengths, seq_len, max_instances_per_row, pad_to_multiple_of)
    n, r = len(examples), len(rows)
    input_ids = np.full((r, width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((r, width), dtype=np.int64)
    segment_ids = np.zeros((r, width), dtype=np.int64)
    cls_positions = np.zeros(n, dtype=np.int64)
    masked = [min(len(e["masked_lm_positions"]), max_predictions) for e in examples]
    offsets = np.concatenate([[0], np.cumsum(masked)])
    width_m = max(-(-int(offsets[-1]) // pad_to_multiple_of) * pad_to_multiple_of, 1)
    positions = np.zeros(width_m, dtype=np.int64)
    labels = np.full(width_m, IGNORE_INDEX, dtype=np.int64)
    bounds = [0]
    for row_index, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            e, length = examples[i], lengths[i]
            input_ids[row_index, start:start + length] = e["input_ids"]
            token_type_ids[row_index, start:start + length] = e["token_type_ids"]
            segment_ids[row_index, start:start + length] = k
            flat = row_index * width + start
            cls_positions[i] = flat
            m, at = masked[i], int(offsets[i])
            positions[at:at + m] = np.asarray(e["masked_lm_positions"][:m]) + flat
            labels[at:at + m] = e["masked_lm_labels"][:m]
            start += length
            bounds.append(row_index * width + start)
        if start < width:
            bounds.append((row_index + 1) * width)
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "segment_ids": segment_ids,
             "cls_positions": cls_positions, "masked_lm_positions": positions, "masked_lm_labels": labels}
    if "sentence_label" in examples[0]:
        batch["sentence_labels"] = np.array([e["sentence_label"] for e in examples], dtype=np.int64)
    batch["cu_seqlens"] = np.array(bounds, dtype=np.int64)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def fill(batch: dict) -> tuple[int, int]:
    """(real tokens, slots) of a batch, packed (``segment_ids``) or padded (``attention_mask``)."""
    real = batch["segment_ids"] > 0 if "segment_ids" in batch else batch["attention_mask"] > 0
    return int(real.sum()), real.numel()
