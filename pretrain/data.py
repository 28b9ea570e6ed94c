"""Training data: data_prep's WebDataset shards, in a global order that makes resume exact.

Design (docs/training.md has the longer story):

* **One global sample order**, a pure function of (seed, epoch): shards are permuted per epoch,
  grouped into windows of about ``data.shuffle_buffer`` samples, and samples are permuted inside
  each window.  Epochs follow one another without a seam, so every optimizer step has a full
  batch and no rank ever waits at an epoch end.
* **A position is one integer**, the number of samples consumed.  Optimizer step ``s`` takes the
  global positions ``[s*G, (s+1)*G)`` (G = global batch); micro-batch ``m`` of rank ``r`` takes the
  slice ``(m*world + r)*micro ...``.  The samples of a step therefore do not depend on the world
  size or the accumulation, and a resume (with any world size) continues with the same batches.
* **Random access into the tar files** through a member index, so loader workers fetch exactly the
  samples they are given: no duplicates, no gaps, whatever the number of workers.  A worker checks
  a shard's size and sha256 against the manifest when it opens it (one sequential read), and every
  sample's values before use: bad data is a DataError naming shard and sample.
* **Dynamic masking** calls data_prep's masking code seeded by (seed, epoch, sample index).
"""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.errors import PrepError
from data_prep.loader import example_from_sample
from data_prep.masking import IGNORE_INDEX
from data_prep.shards import decode_fields, index_shard, read_manifest, read_members, split_info
from data_prep.shards.reader import TarIndex
from pretrain.config import DataConfig, EvalConfig, TrainingConfig


class DataError(ValueError):
    """Bad training data, for the user in one line.  Raised in a DataLoader worker, it is re-created
    in the main process by torch from a message that holds the worker's traceback: the constructor
    keeps only the original message (the last line of that traceback)."""

    def __init__(self, message: str = ""):
        if isinstance(message, str) and message.startswith("Caught DataError in DataLoader worker"):
            _, found, original = message.rpartition(f"\n{DataError.__module__}.DataError: ")
            message = original.rstrip("\n") if found else message
        super().__init__(message)


@dataclass
class DataPosition:
    samples_consumed: int = 0


@dataclass
class Split:
    """One split (train or val) of a shard directory: ``data_prep.shards.split_info`` of its manifest,
    with this run's mlm_probability and max_predictions, and the tokenizer the run uses."""
    dir: str
    info: dict
    tokenizer_dir: Optional[str]
    offsets: list[int] = field(init=False)   # cumulative sample counts of the shards

    def __post_init__(self):
        self.offsets = np.cumsum([0] + self.shard_sizes).tolist()

    @property
    def shards(self) -> list[dict]:
        """The manifest's entries (name, samples, bytes, sha256, ...), in order."""
        return self.info["shards"]

    @property
    def shard_sizes(self) -> list[int]:
        return [int(s["samples"]) for s in self.shards]

    @property
    def num_samples(self) -> int:
        return self.offsets[-1]

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def tokenizer_hash(self) -> str:
        return self.info["tokenizer_hash"]


# --------------------------------------------------------------------------------------------
# Opening a split, with the checks that keep a run from training on the wrong data
# --------------------------------------------------------------------------------------------
def open_split(data_cfg: DataConfig, name: str, training_cfg: TrainingConfig, model_vocab_size: int,
               required: bool = True) -> Optional[Split]:
    if not data_cfg.dir:
        raise DataError("data.dir is empty: point it at a directory written by `python -m data_prep shards`")
    try:
        manifest = read_manifest(data_cfg.dir)
    except PrepError as err:
        raise DataError(str(err)) from None
    info = split_info(manifest, name)
    if not info["shards"]:
        if required:
            raise DataError(f"{data_cfg.dir}: the manifest lists no {name} shards")
        return None
    seq_len = info["seq_len"]
    if seq_len != training_cfg.seq_len:
        raise DataError(f"{data_cfg.dir}: shards were built for seq_len {seq_len} but training.seq_len is "
                        f"{training_cfg.seq_len}")
    if info["vocab_size"] > model_vocab_size:
        raise DataError(f"{data_cfg.dir}: tokenizer vocabulary {info['vocab_size']} exceeds model.vocab_size "
                        f"{model_vocab_size}")
    tokenizer_dir = _check_tokenizer(data_cfg, info)
    if data_cfg.mlm_probability is not None:
        info["mlm_probability"] = data_cfg.mlm_probability
    info["max_predictions"] = training_cfg.max_predictions if info["dynamic"] else \
        min(info["max_predictions"], training_cfg.max_predictions)
    return Split(dir=data_cfg.dir, info=info, tokenizer_dir=tokenizer_dir)


def _check_tokenizer(data_cfg: DataConfig, info: dict) -> Optional[str]:
    """Refuse shards made with another tokenizer than the run's (when the run names one)."""
    from pathlib import Path

    from data_prep import vocab as dp_vocab

    if data_cfg.tokenizer is None:
        return info.get("tokenizer_dir")
    run_hash = dp_vocab.load_tokenizer_dir(Path(data_cfg.tokenizer))[1].sha256
    if info["tokenizer_hash"] != run_hash:
        raise DataError(f"{data_cfg.dir}: shards were tokenized with tokenizer {info['tokenizer_hash']} but "
                        f"data.tokenizer ({data_cfg.tokenizer}) hashes to {run_hash}; rebuild the shards "
                        f"with this tokenizer or point data.tokenizer at the one they were made with")
    return data_cfg.tokenizer


# --------------------------------------------------------------------------------------------
# The global order
# --------------------------------------------------------------------------------------------
class GlobalOrder:
    """Maps a global position to (epoch, sample index); a pure function of (seed, shard sizes)."""

    def __init__(self, shard_sizes: list[int], seed: int, window_samples: int, shuffle: bool = True):
        self.sizes = list(shard_sizes)
        self.total = sum(self.sizes)
        self.seed = seed
        self.shuffle = shuffle and window_samples > 0
        mean_shard = max(1, self.total // max(1, len(self.sizes)))
        self.window_shards = max(1, -(-window_samples // mean_shard)) if self.shuffle else 1
        self.starts = np.cumsum([0] + self.sizes)
        self._epoch_cache: tuple[int, list] | None = None
        self._window_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def _epoch_windows(self, epoch: int) -> list:
        """[(window_start_position, [shard ids])] for one epoch."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        shards = np.arange(len(self.sizes))
        if self.shuffle:
            shards = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(shards)
        windows, pos = [], 0
        for i in range(0, len(shards), self.window_shards):
            group = shards[i:i + self.window_shards].tolist()
            windows.append((pos, group))
            pos += sum(self.sizes[s] for s in group)
        self._epoch_cache = (epoch, windows)
        return windows

    def _window_samples(self, epoch: int, w: int, group: list[int]) -> np.ndarray:
        if self._window_cache and self._window_cache[0] == (epoch, w):
            return self._window_cache[1]
        samples = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in group])
        if self.shuffle:
            samples = np.random.default_rng([self.seed, epoch, w]).permutation(samples)
        self._window_cache = ((epoch, w), samples)
        return samples

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.total)
        windows = self._epoch_windows(epoch)
        w = bisect.bisect_right([start for start, _ in windows], offset) - 1
        start, group = windows[w]
        return epoch, int(self._window_samples(epoch, w, group)[offset - start])


class RankPositions(Sampler):
    """The global positions this rank reads, in order, forever, from ``start``."""

    def __init__(self, start: int, rank: int, world_size: int, micro: int, accum: int):
        self.start, self.rank, self.world, self.micro, self.accum = start, rank, world_size, micro, accum

    def __iter__(self) -> Iterator[int]:
        global_batch = self.micro * self.accum * self.world
        base = self.start
        while True:
            for m in range(self.accum):
                first = base + (m * self.world + self.rank) * self.micro
                yield from range(first, first + self.micro)
            base += global_batch

    def __len__(self):  # infinite; DataLoader only needs it for len(), which we never call
        raise TypeError("RankPositions is infinite")


# --------------------------------------------------------------------------------------------
# Reading samples
# --------------------------------------------------------------------------------------------
class ShardSamples(Dataset):
    """Map-style dataset: global position -> one training example (numpy arrays)."""

    def __init__(self, split: Split, order: GlobalOrder, seed: int):
        self.split, self.order, self.seed = split, order, seed
        # Member indexes and open files of the shards read most recently.  Bounded: over an epoch
        # every worker touches every shard, and an index costs 0.5-0.8 KB a sample (measured).
        # A shuffle window reads its shards in random order, so the bound covers two windows.
        self.max_open = max(16, 2 * order.window_shards)
        self._open_shards: OrderedDict[int, tuple[BinaryIO, TarIndex]] = OrderedDict()

    def _open(self, shard: int) -> None:
        """Open a shard (checked against the manifest's size, sha256 and sample count: one sequential
        read) and index it; the least recently used shard is closed past ``max_open``.  Evicted, a shard
        is checked again.  A shard that fails its check is a PrepError (``__getitem__`` makes it a
        DataError)."""
        self._open_shards[shard] = index_shard(self.split.dir, self.split.shards[shard])
        if len(self._open_shards) > self.max_open:
            self._open_shards.popitem(last=False)[1][0].close()

    def _read_located(self, sample: int) -> tuple[str, dict]:
        """``(where, sample decoded)``: ``where`` ("<shard path>: sample <key>") names it in errors."""
        shard = bisect.bisect_right(self.split.offsets, sample) - 1
        if shard in self._open_shards:
            self._open_shards.move_to_end(shard)
        else:
            self._open(shard)
        f, index = self._open_shards[shard]
        key, members = index[sample - self.split.offsets[shard]]
        where = f"{os.path.join(self.split.dir, self.split.shards[shard]['name'])}: sample {key}"
        return where, decode_fields(read_members(f, members), where)

    def __getitem__(self, position: int) -> dict:
        epoch, sample = self.order(position)
        # data_prep owns the stored format: it decodes and checks, derives token types and masks
        # (dynamic shards: seeded by (seed, epoch, sample index)).
        try:
            where, raw = self._read_located(sample)
            return example_from_sample(raw, self.split.info, seed=self.seed, epoch=epoch, index=sample, where=where)
        except PrepError as err:
            raise DataError(str(err)) from None

    def __len__(self):
        return self.split.num_samples


def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int, max_predictions: int) -> dict:
    """Pad a list of examples into a batch of int64 tensors (attention_mask 1 = real token)."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(examples)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((n, width), dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    positions = np.zeros((n, max_predictions), dtype=np.int64)
    labels = np.full((n, max_predictions), IGNORE_INDEX, dtype=np.int64)
    for i, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[i, :length] = e["input_ids"]
        token_type_ids[i, :length] = e["token_type_ids"]
        attention_mask[i, :length] = 1
        k = min(len(e["masked_lm_positions"]), max_predictions)
        positions[i, :k] = e["masked_lm_positions"][:k]
        labels[i, :k] = e["masked_lm_labels"][:k]
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
             "masked_lm_positions": positions, "masked_lm_labels": labels}
    if "sentence_label" in examples[0]:
        batch["sentence_labels"] = np.array([e["sentence_label"] for e in examples], dtype=np.int64)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class _Collate:
    def __init__(self, split: Split, pad_to_multiple_of: int):
        self.pad_id, self.multiple = split.info["special_ids"]["pad"], pad_to_multiple_of
        self.max_predictions = split.info["max_predictions"]

    def __call__(self, examples):
        return collate(examples, self.pad_id, self.multiple, self.max_predictions)


def _loader(dataset, sampler, micro: int, data_cfg: DataConfig, split: Split) -> DataLoader:
    workers = data_cfg.num_workers
    # Its own generator: DataLoader draws a worker seed when an iterator starts, and drawing it
    # from the global RNG would shift the dropout stream of a resumed run against a straight one.
    # (Workers need no randomness of their own: masking is seeded per sample.)
    generator = torch.Generator().manual_seed(0)
    return _Loader(dataset, batch_size=micro, sampler=sampler, num_workers=workers, generator=generator,
                   collate_fn=_Collate(split, data_cfg.pad_to_multiple_of),
                   pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
                   prefetch_factor=data_cfg.prefetch_factor if workers else None,
                   worker_init_fn=_WorkerInit(os.getpid()) if workers else None,
                   persistent_workers=False, drop_last=False)


class _Loader(DataLoader):
    """A DataLoader whose workers start with the stop signals blocked (see _WorkerInit)."""

    def __iter__(self):
        from pretrain.signals import stop_signals_blocked

        with stop_signals_blocked():      # the workers are forked before the iterator is returned
            return super().__iter__()


class _WorkerInit:
    """Loader workers leave the stop signals to the main process, which checkpoints on them, and
    die with it (pretrain.signals.leave_stop_signals_to, data_prep.procs.die_with_parent); a normal end of the main
    process shuts them down through the DataLoader.  Left to torch's worker handler, a SIGTERM
    from anyone but the main process would end a worker, and the main process would fail with
    "DataLoader worker (pid N) is killed by signal"."""

    def __init__(self, main_pid: int):
        self.main_pid = main_pid

    def __call__(self, worker_id: int) -> None:
        from data_prep.procs import die_with_parent
        from pretrain.signals import leave_stop_signals_to

        leave_stop_signals_to(self.main_pid)
        die_with_parent(self.main_pid)


def build_train_loader(split: Split, data_cfg: DataConfig, training_cfg: TrainingConfig, *,
                       position: DataPosition, rank: int, world_size: int, accum: int) -> DataLoader:
    order = GlobalOrder(split.shard_sizes, training_cfg.seed, data_cfg.shuffle_buffer)
    sampler = RankPositions(position.samples_consumed, rank, world_size, training_cfg.micro_batch_size, accum)
    return _loader(ShardSamples(split, order, training_cfg.seed), sampler, training_cfg.micro_batch_size,
                   data_cfg, split)


class _EvalPositions(Sampler):
    """Whole batches of the held-out split in file order, batch k on rank k % world (no repeats).

    Every rank yields the same number of batches, because under ZeRO-3 each forward is a
    collective: a rank short of one repeats batch 0 after its ``counted_batches`` own batches, and
    the evaluation leaves that padding out of its sums.  The padding is a full batch whenever the
    split has more than one (the short last batch is on a rank that needs no padding), so the
    DataLoader's re-batching of the position stream keeps every batch whole.
    """

    def __init__(self, total: int, rank: int, world_size: int, micro: int, max_batches: int):
        self.total, self.rank, self.world, self.micro = total, rank, world_size, micro
        batches = -(-total // micro)
        self.batches = min(batches, max_batches * world_size) if max_batches else batches
        self.counted_batches = len(range(rank, self.batches, world_size))
        self.forward_batches = -(-self.batches // world_size)

    def _batch(self, b: int) -> range:
        return range(b * self.micro, min((b + 1) * self.micro, self.total))

    def __iter__(self):
        for b in range(self.rank, self.batches, self.world):
            yield from self._batch(b)
        for _ in range(self.forward_batches - self.counted_batches):
            yield from self._batch(0)


def build_eval_loader(split: Split, data_cfg: DataConfig, training_cfg: TrainingConfig, eval_cfg: EvalConfig, *,
                      rank: int, world_size: int) -> DataLoader:
    micro = eval_cfg.micro_batch_size or training_cfg.micro_batch_size
    order = GlobalOrder(split.shard_sizes, training_cfg.seed, 0, shuffle=False)
    sampler = _EvalPositions(split.num_samples, rank, world_size, micro, eval_cfg.max_batches)
    return _loader(ShardSamples(split, order, training_cfg.seed), sampler, micro, data_cfg, split)
