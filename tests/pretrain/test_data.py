"""The training loader: global order, per-rank slices, whole-shard reads, collate, refusals."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.masking import IGNORE_INDEX
from pretrain.config import DataConfig, EvalConfig, TrainingConfig
from pretrain.data import (DataError, DataPosition, GlobalOrder, RankPositions, _EvalPositions, build_eval_loader,
                           build_train_loader, collate, open_split)
from tests.pretrain.training_helpers import build_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("loader"), "dynamic", lines=600)


def test_global_order_is_a_permutation_per_epoch_and_differs_between_epochs():
    sizes = [7, 3, 11, 5]
    order = GlobalOrder(sizes, seed=3, window_samples=8)
    n = sum(sizes)
    epoch0 = [order(p) for p in range(n)]
    epoch1 = [order(p) for p in range(n, 2 * n)]
    assert sorted(s for _, s in epoch0) == list(range(n)) and {e for e, _ in epoch0} == {0}
    assert sorted(s for _, s in epoch1) == list(range(n)) and {e for e, _ in epoch1} == {1}
    assert [s for _, s in epoch0] != [s for _, s in epoch1]
    assert [order(p) for p in range(n)] == epoch0                      # pure function of the position
    assert [GlobalOrder(sizes, seed=4, window_samples=8)(p) for p in range(n)] != epoch0


def test_unshuffled_order_is_file_order():
    order = GlobalOrder([4, 4], seed=1, window_samples=0, shuffle=False)
    assert [order(p)[1] for p in range(8)] == list(range(8))


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_each_step_reads_the_same_samples_whatever_the_world_size(world, accum):
    micro, steps = 3, 5
    global_batch = micro * accum * world
    per_rank = []
    for rank in range(world):
        positions = RankPositions(start=6 * 12, rank=rank, world_size=world, micro=micro, accum=accum)
        per_rank.append(list(itertools.islice(iter(positions), micro * accum * steps)))
    for s in range(steps):
        taken = sorted(p for rank in per_rank for p in rank[s * micro * accum:(s + 1) * micro * accum])
        start = 6 * 12 + s * global_batch
        assert taken == list(range(start, start + global_batch)), "duplicates or gaps in a step"


def test_eval_positions_cover_the_split_once_over_ranks():
    for world in (1, 2, 3):
        seen = [p for r in range(world) for p in _EvalPositions(total=23, rank=r, world_size=world, micro=4,
                                                                  max_batches=0)]
        assert sorted(seen) == list(range(23))


def test_collate_pads_to_a_multiple_of_8_with_ignore_labels():
    examples = [{"input_ids": np.arange(2, 12), "token_type_ids": np.zeros(10, np.uint8),
                 "masked_lm_positions": np.array([1, 3]), "masked_lm_labels": np.array([5, 6]), "sentence_label": 1},
                {"input_ids": np.arange(2, 7), "token_type_ids": np.ones(5, np.uint8),
                 "masked_lm_positions": np.array([2]), "masked_lm_labels": np.array([9]), "sentence_label": 0}]
    batch = collate(examples, pad_id=0, pad_to_multiple_of=8, max_predictions=4)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [10, 5]
    assert batch["masked_lm_labels"].tolist() == [[5, 6, -100, -100], [9, -100, -100, -100]]
    assert batch["sentence_labels"].tolist() == [1, 0]
    assert all(v.dtype == torch.int64 for v in batch.values())


def _cfgs(shards: Path, workers: int):
    data = DataConfig(dir=str(shards / "shards"), tokenizer=str(shards / "tokenizer"), num_workers=workers,
                      shuffle_buffer=64)
    training = TrainingConfig(micro_batch_size=4, global_batch_size=8, seq_len=128, max_predictions=20, seed=5)
    return data, training


def _key(batch: dict, i: int) -> tuple:
    length = int(batch["attention_mask"][i].sum())
    return tuple(batch["input_ids"][i, :length].tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_loaders_read_the_global_batches_and_resume_mid_stream(shards, workers):
    data, training = _cfgs(shards, workers)
    split = open_split(data, "train", training, model_vocab_size=2048)
    single = iter(build_train_loader(split, data, training, position=DataPosition(0), rank=0, world_size=1,
                                     accum=2))
    reference = [_key(b, i) for b in itertools.islice(single, 6) for i in range(4)]
    ranks = [iter(build_train_loader(split, data, training, position=DataPosition(0), rank=r, world_size=2,
                                     accum=1)) for r in range(2)]
    two = [_key(batch, i) for _ in range(3) for batch in (next(ranks[0]), next(ranks[1])) for i in range(4)]
    assert two == reference                            # same samples, same masks, in the same step order
    resumed = iter(build_train_loader(split, data, training, position=DataPosition(8), rank=0, world_size=1,
                                      accum=2))
    assert [_key(b, i) for b in itertools.islice(resumed, 4) for i in range(4)] == reference[8:]


def test_tokenizer_mismatch_is_refused_with_both_hashes(shards, tmp_path):
    other = build_shards(tmp_path / "other", "dynamic", lines=300)
    data, training = _cfgs(shards, 0)
    data.tokenizer = str(other / "tokenizer")
    with pytest.raises(DataError, match="tokenized with tokenizer .* but data.tokenizer .* hashes to"):
        open_split(data, "train", training, model_vocab_size=2048)


def test_wrong_seq_len_or_small_vocab_or_missing_dir_is_refused(shards, tmp_path):
    data, training = _cfgs(shards, 0)
    training.seq_len = 64
    with pytest.raises(DataError, match="built for seq_len 128 but training.seq_len is 64"):
        open_split(data, "train", training, model_vocab_size=2048)
    training.seq_len = 128
    with pytest.raises(DataError, match="exceeds model.vocab_size 1000"):
        open_split(data, "train", training, model_vocab_size=1000)
    data.dir = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere.*manifest.json"):
        open_split(data, "train", training, model_vocab_size=2048)


def test_shard_with_wrong_sample_count_is_named(shards, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards / "shards", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first_train = next(s for s in manifest["shards"] if s["split"] == "train")
    first_train["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data, training = _cfgs(shards, 0)
    data.dir, data.tokenizer = str(copy), None
    split = open_split(data, "train", training, model_vocab_size=2048)
    loader = build_eval_loader(split, data, training, EvalConfig(max_batches=1), rank=0, world_size=1)
    with pytest.raises(DataError, match=f"{copy}/{first_train['name']}: chunk .*: lengths holds .* items, expected"):
        next(iter(loader))


def test_decoded_shards_kept_stay_bounded_and_reads_stay_right(shards):
    """A loader worker keeps the decoded shards of two shuffle windows per source (least recently used
    go); a shard read again after it went reads back the same samples."""
    from pretrain.data import FileOrder, MixedOrder, ShardSamples

    data, training = _cfgs(shards, 0)
    split = open_split(data, "train", training, model_vocab_size=2048)
    part = split.splits[0]
    assert len(part.shards) >= 2
    window = MixedOrder(split, data.shuffle_buffer).window_shards(0)
    assert ShardSamples(split, MixedOrder(split, data.shuffle_buffer)).max_kept == [2 * window]
    bounded, fresh = ShardSamples(split, FileOrder(split)), ShardSamples(split, FileOrder(split))
    assert bounded.max_kept == [2]
    bounded.max_kept = [1]
    samples = [s for _ in range(2) for s in part.offsets[:-1]] + [part.num_samples - 1, 0]  # first of each shard
    for s in samples:
        got = bounded._read_located(0, s)[1]
        assert len(bounded._kept[0]) <= 1
        expected = fresh._read_located(0, s)[1]
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in got)


def test_the_loader_benchmark_runs_on_a_tiny_directory(shards, capsys):
    """bench/loader_throughput.py (not a test itself) prints its table for a given shard directory."""
    import importlib.util

    from tests.pretrain.training_helpers import REPO

    spec = importlib.util.spec_from_file_location("loader_throughput", REPO / "bench" / "loader_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--seq", "128", "--data-128", str(shards / "shards"), "--samples", "64"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| seq | samples/s per worker") and rows[2].startswith("| 128 | ")
    assert "read calls per shard" in rows[0] and "one GPU needs" in rows[0]


# --------------------------------------------------------------------------------------------
# The local tokenizer copy of a remote shard directory
# --------------------------------------------------------------------------------------------
def _tokenizer_source(shards: Path):
    from data_prep.shards.store import open_store
    manifest = json.loads((shards / "shards" / "manifest.json").read_text())
    return open_store(str(shards / "shards")), manifest["tokenizer"]["dir"], manifest["tokenizer"]["sha256"]


def test_a_stale_tokenizer_copy_is_replaced(shards, tmp_path):
    import shutil

    from data_prep.vocab import tokenizer_hash
    from pretrain.data import _fetch_tokenizer
    store, stored, expected = _tokenizer_source(shards)
    final = tmp_path / "tokenizers" / expected[:32]
    other = build_shards(tmp_path / "other", "dynamic", lines=300)   # a copy of another tokenizer there
    shutil.copytree(other / "tokenizer", final)
    assert _fetch_tokenizer(store, stored, expected, str(tmp_path)) == str(final)
    assert tokenizer_hash(final) == expected
    assert [p.name for p in final.parent.iterdir()] == [final.name]    # no temp or stale copy left


def test_a_copy_another_rank_installed_meanwhile_is_kept_for_its_readers(shards, tmp_path):
    import shutil

    from pretrain.data import _fetch_tokenizer
    store, stored, expected = _tokenizer_source(shards)
    final = tmp_path / "tokenizers" / expected[:32]
    read = store.read

    def read_while_another_rank_installs(name):
        if not final.exists():
            shutil.copytree(shards / "shards" / stored, final)
            read_while_another_rank_installs.inode = (final / "tokenizer.json").stat().st_ino
        return read(name)

    store.read = read_while_another_rank_installs
    _fetch_tokenizer(store, stored, expected, str(tmp_path))
    assert (final / "tokenizer.json").stat().st_ino == read_while_another_rank_installs.inode


def test_the_default_tokenizer_root_must_be_this_user_s_alone_and_os_errors_are_data_errors(shards, tmp_path,
                                                                                               monkeypatch):
    import os
    import tempfile

    from pretrain.data import _fetch_tokenizer
    store, stored, expected = _tokenizer_source(shards)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = tmp_path / f"bertforge-{os.getuid()}"
    root.mkdir()
    root.chmod(0o777)                                  # as if another user had made it for everyone
    with pytest.raises(DataError, match=f"{root}: not a directory of this user that only it can write"):
        _fetch_tokenizer(store, stored, expected, None)
    root.chmod(0o700)
    assert _fetch_tokenizer(store, stored, expected, None) == str(root / "tokenizers" / expected[:32])
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(DataError, match=f"{blocked}/tokenizers: cannot hold the tokenizer's local copy"):
        _fetch_tokenizer(store, stored, expected, str(blocked))


def test_shards_that_claim_more_samples_than_they_hold_are_refused_before_the_window_is_built(shards, tmp_path):
    """A window's permutation takes memory by the samples its shards claim: those claims are checked on
    the shards (read whole) first, so a lying manifest is a DataError, not an allocation of its claim."""
    import shutil

    from pretrain.data import MixedOrder, ShardSamples
    copy = tmp_path / "copy"
    shutil.copytree(shards / "shards", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["split"] == "train":
            entry["samples"] = entry["tokens"] = entry["bytes"] = 10**13   # 80 TB of sample ids, were they allocated
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data, training = _cfgs(shards, 0)
    data.dir, data.tokenizer = str(copy), None
    split = open_split(data, "train", training, model_vocab_size=2048)
    with pytest.raises(DataError, match=f"{copy}/train-"):
        ShardSamples(split, MixedOrder(split, data.shuffle_buffer))[0]


def test_packing_packs_the_training_micro_batches_of_the_unpacked_order_and_leaves_eval_unpacked(shards):
    """data.packing: each training micro-batch holds the instances the unpacked loader gives it (the
    sentence labels and masked labels in the same order), in fewer rows; the held-out loader is the
    unpacked one, batch for batch."""
    from dataclasses import replace

    data, training = _cfgs(shards, 0)
    training = replace(training, micro_batch_size=16, global_batch_size=16)
    split = open_split(data, "train", training, model_vocab_size=2048)
    loaders = [build_train_loader(split, replace(data, packing=packing), training, position=DataPosition(0),
                                  rank=0, world_size=1, accum=1) for packing in (False, True)]
    for (plain, packed), _ in zip(zip(*loaders), range(3)):
        assert "segment_ids" in packed and packed["input_ids"].size(0) < 16
        assert torch.equal(packed["sentence_labels"], plain["sentence_labels"])
        masked = plain["masked_lm_labels"][plain["masked_lm_labels"] != IGNORE_INDEX]   # in order, unpadded
        assert torch.equal(packed["masked_lm_labels"][:len(masked)], masked)
        assert int((packed["segment_ids"] > 0).sum()) == int(plain["attention_mask"].sum())
    val = open_split(data, "val", training, model_vocab_size=2048)
    evals = [list(build_eval_loader(val, replace(data, packing=packing), training, EvalConfig(), rank=0,
                                    world_size=1)) for packing in (False, True)]
    assert len(evals[0]) == len(evals[1]) > 0
    for plain, packed in zip(*evals):
        assert plain.keys() == packed.keys() and "segment_ids" not in packed
        assert all(torch.equal(plain[k], packed[k]) for k in plain)
