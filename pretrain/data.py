"""Training data: data_prep's shards, read whole, in a global order that makes resume exact.

Design (docs/training.md has the longer story):

* **One global sample order**, a pure function of (seed, epoch): shards are permuted per epoch,
  grouped into windows of about ``data.shuffle_buffer`` samples, and samples are permuted inside
  each window.  Epochs follow one another without a seam, so every optimizer step has a full
  batch and no rank ever waits at an epoch end.
* **A position is one integer**, the number of samples consumed.  Optimizer step ``s`` takes the
  global positions ``[s*G, (s+1)*G)`` (G = global batch); micro-batch ``m`` of rank ``r`` takes the
  slice ``(m*world + r)*micro ...``.  The samples of a step therefore do not depend on the world
  size or the accumulation, and a resume (with any world size) continues with the same batches.
* **Mixing**: with several sources (``data.sources``) a position first maps to (source, ordinal) by
  the weights (``pretrain.mixing.Blend``), then the ordinal to (epoch, sample) by that source's own
  order and seed.  One source is the plain order above.
* **Whole shards**: a loader worker reads a shard whole through its store (a local directory, a URL,
  a ``pipe:``: ``data_prep.shards.store``), sha256-checked while it reads, decodes it in memory
  (``data_prep.shards.decode_shard``) and keeps the decoded shards of the current and next shuffle
  window, so it serves exactly the samples it is given: no duplicates, no gaps, whatever the number
  of workers.  Every sample is checked before use: bad data is a DataError naming shard and sample.
* **Dynamic masking** calls data_prep's masking code seeded by (seed, epoch, sample index).
* **Packing** (``data.packing``) changes only how a training micro-batch's instances are laid into rows
  (``pretrain.packing``); the positions, and so everything above, are those of unpacked training.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.errors import PrepError
from data_prep.loader import example_from_sample
from data_prep.masking import IGNORE_INDEX
from data_prep.shards import MANIFEST, DecodedShard, parse_manifest, read_entry, split_info
from data_prep.shards.store import Store, open_store
from pretrain.config import DataConfig, EvalConfig, SourceConfig, TrainingConfig
from pretrain.mixing import Blend
from pretrain.packing import collate_packed


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
    """One split (train or val) of one source: ``data_prep.shards.split_info`` of its manifest, with
    this run's mlm_probability and max_predictions, the store its shards are read through, the
    seed of its order and masks, and the tokenizer the run uses."""
    name: str
    dir: str
    store: Store
    info: dict
    tokenizer_dir: Optional[str]
    seed: int
    weight: float = 1.0
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


@dataclass
class Mixture:
    """The split of every source of the run (one for ``data.dir``), which share the tokenizer and the
    shard settings (``open_split`` checks it): ``info`` and the tokenizer are the first source's."""
    splits: list[Split]

    @property
    def info(self) -> dict:
        return self.splits[0].info

    @property
    def tokenizer_hash(self) -> str:
        return self.info["tokenizer_hash"]

    @property
    def tokenizer_dir(self) -> Optional[str]:
        return self.splits[0].tokenizer_dir

    @property
    def fingerprint(self) -> str:
        """The data fingerprint a checkpoint records: one source's own (so a run of ``data.dir`` keeps
        the one it always had), or a digest of every source's name, fingerprint and weight."""
        if len(self.splits) == 1:
            return self.info["fingerprint"]
        parts = [[s.name, s.info["fingerprint"], s.weight] for s in self.splits]
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()

    @property
    def converted_from(self) -> Optional[str]:
        """The fingerprint of the format-1 directory that ``data_prep convert`` made the one source from
        (the manifest's ``converted_from``): a checkpoint taken on that directory resumes on this one
        (``checkpoint.check_fingerprints``).  None for a directory not converted, or several sources."""
        return self.info["converted_from"] if len(self.splits) == 1 else None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits)

    def blend(self) -> Blend:
        return Blend([s.weight for s in self.splits])

    def progress(self, samples_consumed: int) -> dict:
        """Per source: the samples it has given to the first ``samples_consumed`` positions and the
        epochs they make (fractional), for the metrics log."""
        blend, out = self.blend(), {}
        for i, s in enumerate(self.splits):
            count = blend.count(i, samples_consumed)
            out[f"data/{s.name}/samples"] = float(count)
            out[f"data/{s.name}/epochs"] = count / s.num_samples
        return out

    def part(self, i: int) -> "Mixture":
        return Mixture([self.splits[i]])


# --------------------------------------------------------------------------------------------
# Opening a split, with the checks that keep a run from training on the wrong data
# --------------------------------------------------------------------------------------------
# What the sources of a mixture must agree on (split_info's keys): one tokenizer, one sample format.
SHARED = ("tokenizer_hash", "vocab_size", "special_ids", "seq_len", "objective", "dynamic", "whole_word",
          "max_predictions", "mlm_probability")


def source_seed(seed: int, index: int) -> int:
    """The seed of source ``index``'s order and masks: the run's own for the first source (so one
    source is the plain run), one drawn from (seed, index) for the others."""
    return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def open_split(data_cfg: DataConfig, name: str, training_cfg: TrainingConfig, model_vocab_size: int,
               required: bool = True) -> Optional[Mixture]:
    """The ``name`` split of every source.  ``required``: every source must have one; otherwise
    sources without it are left out, and None is returned when none has it."""
    sources = data_cfg.source_list()
    if not sources[0].dir:
        raise DataError("data.dir is empty: point it at a directory written by `python -m data_prep shards` "
                        "(or list data.sources)")
    splits = []
    for i, source in enumerate(sources):
        split = _open_source(source, data_cfg, name, training_cfg, model_vocab_size, required,
                             source_seed(training_cfg.seed, i))
        if split is not None:
            splits.append(split)
    for other in splits[1:]:
        _check_shared(splits[0], other)
    return Mixture(splits) if splits else None


def _open_source(source: SourceConfig, data_cfg: DataConfig, name: str, training_cfg: TrainingConfig,
                 model_vocab_size: int, required: bool, seed: int) -> Optional[Split]:
    where = source.dir
    try:
        store = open_store(source.dir, data_cfg.cache_dir)
        manifest = parse_manifest(store.read(MANIFEST), store.where(MANIFEST),
                                  None if store.remote else store.where(""))
    except PrepError as err:
        raise DataError(f"{err} (expected a shard directory written by `python -m data_prep shards`)") from None
    info = split_info(manifest, name)
    if not info["shards"]:
        if required:
            raise DataError(f"{where}: the manifest lists no {name} shards")
        return None
    seq_len = info["seq_len"]
    if seq_len != training_cfg.seq_len:
        raise DataError(f"{where}: shards were built for seq_len {seq_len} but training.seq_len is "
                        f"{training_cfg.seq_len}")
    if info["vocab_size"] > model_vocab_size:
        raise DataError(f"{where}: tokenizer vocabulary {info['vocab_size']} exceeds model.vocab_size "
                        f"{model_vocab_size}")
    tokenizer_dir = _check_tokenizer(data_cfg, info, store, where, manifest["tokenizer"]["dir"])
    if data_cfg.mlm_probability is not None:
        info["mlm_probability"] = data_cfg.mlm_probability
    info["max_predictions"] = training_cfg.max_predictions if info["dynamic"] else \
        min(info["max_predictions"], training_cfg.max_predictions)
    return Split(name=source.name, dir=source.dir, store=store, info=info, tokenizer_dir=tokenizer_dir,
                 seed=seed, weight=source.weight)


def _check_shared(first: Split, other: Split) -> None:
    for key in SHARED:
        if first.info[key] != other.info[key]:
            raise DataError(f"data.sources: {first.name} ({first.dir}) and {other.name} ({other.dir}) differ in "
                            f"{key}: {first.info[key]!r} vs {other.info[key]!r}; the sources of a mixture must "
                            f"share the tokenizer and the shard settings")


def _check_tokenizer(data_cfg: DataConfig, info: dict, store: Store, where: str, stored_dir: str) -> Optional[str]:
    """The tokenizer directory of the run: ``data.tokenizer`` when given (refused when its hash is not
    the shards'), else the shard directory's copy (fetched through the store into a local directory
    when the shards are not local)."""
    from pathlib import Path

    from data_prep import vocab as dp_vocab

    if data_cfg.tokenizer is None:
        return store.where(stored_dir) if not store.remote else \
            _fetch_tokenizer(store, stored_dir, info["tokenizer_hash"], data_cfg.cache_dir)
    try:
        run_hash = dp_vocab.load_tokenizer_dir(Path(data_cfg.tokenizer))[1].sha256
    except PrepError as err:
        raise DataError(f"data.tokenizer: {err}") from None
    if info["tokenizer_hash"] != run_hash:
        raise DataError(f"{where}: shards were tokenized with tokenizer {info['tokenizer_hash']} but "
                        f"data.tokenizer ({data_cfg.tokenizer}) hashes to {run_hash}; rebuild the shards "
                        f"with this tokenizer or point data.tokenizer at the one they were made with")
    return data_cfg.tokenizer


def _fetch_tokenizer(store: Store, stored_dir: str, expected_hash: str, cache_dir: Optional[str]) -> str:
    """A local copy of a remote shard directory's tokenizer, in ``<cache_dir or a private temp dir>/
    tokenizers/<hash>``: fetched once (to a temp directory, hash-checked, renamed into place), reused
    while it hashes right.  The ranks of a node fetch it together: each installs a whole copy or keeps
    the good one another installed first (``_install``)."""
    from data_prep.vocab import TOKENIZER_FILES, tokenizer_hash

    root = os.path.join(cache_dir or _private_temp_root(), "tokenizers")
    final = os.path.join(root, expected_hash[:32])
    if _holds_tokenizer(final, expected_hash):
        return final
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fetch-", dir=root)
    except OSError as err:
        raise DataError(f"{root}: cannot hold the tokenizer's local copy ({err.strerror or err})") from None
    try:
        for file in TOKENIZER_FILES:
            with open(os.path.join(tmp, file), "wb") as f:
                f.write(store.read(f"{stored_dir}/{file}"))
        found = tokenizer_hash(tmp)
        if found != expected_hash:
            raise DataError(f"{store.where(stored_dir)}: the tokenizer hashes to {found}, its manifest says "
                            f"{expected_hash}")
        _install(tmp, final, expected_hash)
    except PrepError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"{final}: cannot install the tokenizer's local copy ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _holds_tokenizer(path: str, expected_hash: str) -> bool:
    """Whether ``path`` is a tokenizer directory that hashes to ``expected_hash``."""
    from data_prep.vocab import tokenizer_hash

    try:
        return os.path.isfile(os.path.join(path, "tokenizer.json")) and tokenizer_hash(path) == expected_hash
    except (OSError, PrepError):
        return False


def _install(tmp: str, final: str, expected_hash: str, attempts: int = 3) -> None:
    """Rename the checked copy ``tmp`` to ``final``, unless a good copy is there already (another process
    installed it first: it stays, for the readers that found it).  A bad copy there is renamed aside
    before it is removed, so ``final`` only ever changes by a rename."""
    for _ in range(attempts):
        try:
            os.replace(tmp, final)
            return
        except OSError:                   # final is there (a directory that is not empty)
            if _holds_tokenizer(final, expected_hash):
                return
        aside = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(final))
        try:
            os.replace(final, aside)
        except FileNotFoundError:         # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    raise DataError(f"{final}: a bad tokenizer copy came back {attempts} times while this process installed "
                    f"a good one; remove the directory")


def _private_temp_root() -> str:
    """``<temp dir>/bertforge-<uid>`` (made mode 0700), refused unless it is a directory of this user that
    nobody else can write: a tokenizer planted there by another user would be trusted."""
    root = os.path.join(tempfile.gettempdir(), f"bertforge-{os.getuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise DataError(f"{root}: cannot make it ({err.strerror}); set data.cache_dir") from None
    found = os.lstat(root)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o022:
        raise DataError(f"{root}: not a directory of this user that only it can write (owner uid {found.st_uid}, "
                        f"mode {stat.filemode(found.st_mode)}); remove it or set data.cache_dir")
    return root


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

    def _window_samples(self, epoch: int, w: int, group: list[int], ready: Optional[Callable]) -> np.ndarray:
        if self._window_cache and self._window_cache[0] == (epoch, w):
            return self._window_cache[1]
        if ready is not None:
            ready(group)
        samples = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in group])
        if self.shuffle:
            samples = np.random.default_rng([self.seed, epoch, w]).permutation(samples)
        self._window_cache = ((epoch, w), samples)
        return samples

    def __call__(self, position: int, ready: Optional[Callable[[list[int]], None]] = None) -> tuple[int, int]:
        """``ready(shard ids)`` is called before a window's permutation is built, which takes memory by
        the samples its shards claim: the reader checks those claims on the shards themselves first."""
        epoch, offset = divmod(position, self.total)
        windows = self._epoch_windows(epoch)
        w = bisect.bisect_right([start for start, _ in windows], offset) - 1
        start, group = windows[w]
        return epoch, int(self._window_samples(epoch, w, group, ready)[offset - start])


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
class MixedOrder:
    """Training positions -> (source, epoch, sample index in that source): the blend of the sources'
    weights, then each source's own GlobalOrder (its seed, its epochs)."""

    def __init__(self, mixture: Mixture, window_samples: int):
        self.blend = mixture.blend()
        self.orders = [GlobalOrder(s.shard_sizes, s.seed, window_samples) for s in mixture.splits]

    def __call__(self, position: int, ready: Optional[Callable[[int, list[int]], None]] = None) -> tuple[int, int, int]:
        """``ready(source, shard ids)``: as GlobalOrder's, with the source."""
        source, ordinal = self.blend(position)
        return (source, *self.orders[source](ordinal, ready and (lambda group: ready(source, group))))

    def window_shards(self, source: int) -> int:
        return self.orders[source].window_shards


class FileOrder:
    """Held-out positions -> (source, 0, sample index): the sources' samples one after the other, in
    file order."""

    def __init__(self, mixture: Mixture):
        self.starts = np.cumsum([0] + [s.num_samples for s in mixture.splits]).tolist()

    def __call__(self, position: int, ready=None) -> tuple[int, int, int]:
        """(``ready``: not called; this order builds nothing by the samples the shards claim.)"""
        source = bisect.bisect_right(self.starts, position) - 1
        return source, 0, position - self.starts[source]

    def window_shards(self, source: int) -> int:
        return 1


class ShardSamples(Dataset):
    """Map-style dataset: global position -> one training example (numpy arrays).

    Shards are read whole through their source's store (size and sha256 checked against the
    manifest while reading) and decoded in memory.  A worker keeps, per source, the decoded shards
    it read most recently, up to two shuffle windows' worth (the current one and the next, which
    the batches at a window's end reach into): a window's shards are all read when its first sample
    is asked for, before its permutation is built from their (then checked) sample counts, and
    every worker reads every shard of the window, each once per epoch."""

    def __init__(self, mixture: Mixture, order: Callable[[int], tuple[int, int, int]]):
        self.mixture, self.order = mixture, order
        self.max_kept = [2 * order.window_shards(i) for i in range(len(mixture.splits))]
        self._kept: list[OrderedDict[int, DecodedShard]] = [OrderedDict() for _ in mixture.splits]

    def _shard(self, source: int, shard: int) -> DecodedShard:
        """Decoded shard ``shard`` of a source, read (and the least recently used one dropped past
        ``max_kept``) when it is not kept.  A shard that fails its checks is a PrepError."""
        kept = self._kept[source]
        if shard in kept:
            kept.move_to_end(shard)
            return kept[shard]
        split = self.mixture.splits[source]
        decoded = read_entry(split.store, split.shards[shard])
        kept[shard] = decoded
        if len(kept) > self.max_kept[source]:
            kept.popitem(last=False)
        return decoded

    def _read_located(self, source: int, sample: int) -> tuple[str, dict]:
        """``(where, sample decoded)``: ``where`` ("<shard>: sample <key>") names it in errors."""
        split = self.mixture.splits[source]
        shard = bisect.bisect_right(split.offsets, sample) - 1
        decoded = self._shard(source, shard)
        i = sample - split.offsets[shard]
        return f"{split.store.where(split.shards[shard]['name'])}: sample {decoded.key(i)}", decoded.sample(i)

    def _read_window(self, source: int, shards: list[int]) -> None:
        for shard in shards:
            self._shard(source, shard)

    def __getitem__(self, position: int) -> dict:
        # data_prep owns the stored format: it decodes and checks, derives token types and masks
        # (dynamic shards: seeded by (the source's seed, epoch, sample index)).
        try:
            source, epoch, sample = self.order(position, self._read_window)
            split = self.mixture.splits[source]
            where, raw = self._read_located(source, sample)
            return example_from_sample(raw, split.info, seed=split.seed, epoch=epoch, index=sample, where=where)
        except PrepError as err:
            raise DataError(str(err)) from None

    def __len__(self):
        return self.mixture.num_samples


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
    """Examples -> a padded batch, or a packed one (``max_instances_per_row`` set: pretrain.packing)."""

    def __init__(self, split: Mixture, pad_to_multiple_of: int, max_instances_per_row: Optional[int] = None):
        self.pad_id, self.multiple = split.info["special_ids"]["pad"], pad_to_multiple_of
        self.max_predictions, self.seq_len = split.info["max_predictions"], split.info["seq_len"]
        self.max_instances_per_row = max_instances_per_row

    def __call__(self, examples):
        if self.max_instances_per_row:
            return collate_packed(examples, self.pad_id, self.seq_len, self.max_predictions,
                                  self.max_instances_per_row, self.multiple)
        return collate(examples, self.pad_id, self.multiple, self.max_predictions)


def _loader(dataset, sampler, micro: int, data_cfg: DataConfig, split: Mixture, packed: bool = False) -> DataLoader:
    workers = data_cfg.num_workers
    # Its own generator: DataLoader draws a worker seed when an iterator starts, and drawing it
    # from the global RNG would shift the dropout stream of a resumed run against a straight one.
    # (Workers need no randomness of their own: masking is seeded per sample.)
    generator = torch.Generator().manual_seed(0)
    return _Loader(dataset, batch_size=micro, sampler=sampler, num_workers=workers, generator=generator,
                   collate_fn=_Collate(split, data_cfg.pad_to_multiple_of,
                                       data_cfg.max_instances_per_row if packed else None),
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


def build_train_loader(split: Mixture, data_cfg: DataConfig, training_cfg: TrainingConfig, *,
                       position: DataPosition, rank: int, world_size: int, accum: int) -> DataLoader:
    order = MixedOrder(split, data_cfg.shuffle_buffer)
    sampler = RankPositions(position.samples_consumed, rank, world_size, training_cfg.micro_batch_size, accum)
    return _loader(ShardSamples(split, order), sampler, training_cfg.micro_batch_size, data_cfg, split,
                   packed=data_cfg.packing)


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


def build_eval_loader(split: Mixture, data_cfg: DataConfig, training_cfg: TrainingConfig, eval_cfg: EvalConfig, *,
                      rank: int, world_size: int) -> DataLoader:
    """The held-out samples of every source of ``split`` in file order (one source: ``split.part(i)``)."""
    micro = eval_cfg.micro_batch_size or training_cfg.micro_batch_size
    sampler = _EvalPositions(split.num_samples, rank, world_size, micro, eval_cfg.max_batches)
    return _loader(ShardSamples(split, FileOrder(split)), sampler, micro, data_cfg, split)
