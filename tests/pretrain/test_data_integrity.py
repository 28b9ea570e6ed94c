"""The training loader on damaged or hostile shards: a clear one-line DataError naming shard and sample,
in the main process and from DataLoader workers alike, and through `pretrain train` (exit 2)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.config import DataConfig, TrainingConfig
from pretrain.data import DataError, DataPosition, build_train_loader, open_split
from tests.data_prep.test_verify import edit_manifest, rewrite_members, rewrite_shard, sample_slice, with_token
from tests.pretrain.training_helpers import TINY, build_shards, launch


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    return {masking: build_shards(root / masking, masking, lines=600) / "shards" for masking in ("dynamic", "static")}


def _copy(built, masking: str, tmp_path: Path) -> Path:
    shutil.copytree(built[masking], tmp_path / "shards")
    return tmp_path / "shards"


def _train_shards(shard_dir: Path) -> list[str]:
    return sorted(p.name for p in shard_dir.glob("train-*.tar"))


def _first_batch(shard_dir: Path, workers: int):
    data = DataConfig(dir=str(shard_dir), tokenizer=None, num_workers=workers, shuffle_buffer=64)
    training = TrainingConfig(micro_batch_size=4, global_batch_size=8, seq_len=128, max_predictions=20, seed=5)
    split = open_split(data, "train", training, model_vocab_size=2048)
    return next(iter(build_train_loader(split, data, training, position=DataPosition(0), rank=0, world_size=1,
                                        accum=2)))


def _one_line_error(shard_dir: Path, workers: int) -> str:
    with pytest.raises(DataError) as caught:
        _first_batch(shard_dir, workers)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_flipped_bit_in_a_shard_is_refused_with_its_name(built, tmp_path, workers):
    shard_dir = _copy(built, "dynamic", tmp_path)
    for name in _train_shards(shard_dir):
        data = bytearray((shard_dir / name).read_bytes())
        data[700] ^= 0x01                      # same size, other content
        (shard_dir / name).write_bytes(bytes(data))
    message = _one_line_error(shard_dir, workers)
    assert f"{shard_dir}/train-00000" in message and "sha256" in message and "does not match the manifest" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_an_out_of_range_token_names_shard_and_sample(built, tmp_path, workers):
    shard_dir = _copy(built, "dynamic", tmp_path)
    for name in _train_shards(shard_dir):
        rewrite_shard(shard_dir, name, with_token(4000))
    message = _one_line_error(shard_dir, workers)
    assert f"{shard_dir}/train-00000" in message and ": sample train-00000" in message
    assert "input_ids: 4000 at position 1 is outside [0, 2048)" in message


def test_static_labels_and_positions_out_of_range_are_named(built, tmp_path):
    shard_dir = _copy(built, "static", tmp_path)

    def filled(column: str, value: int):
        """A mutation: every value of ``column`` set to ``value``."""
        def mutate(columns):
            columns[column][:] = value
        return mutate
    for name in _train_shards(shard_dir):
        rewrite_shard(shard_dir, name, filled("masked_lm_ids", 3000))
    message = _one_line_error(shard_dir, 0)
    assert f"{shard_dir}/train-00000" in message and "masked_lm_ids" in message and "3000" in message
    shard_dir = _copy(built, "static", tmp_path / "again")

    def far_position(columns):
        columns["masked_lm_positions"][sample_slice(columns, 0, "masked_lm_positions")] = 200
    for name in _train_shards(shard_dir):
        rewrite_shard(shard_dir, name, far_position)
    message = _one_line_error(shard_dir, 0)
    assert f"{shard_dir}/train-00000" in message and "masked_lm_positions" in message and "200" in message


def test_a_broken_npy_header_names_shard_and_member(built, tmp_path):
    shard_dir = _copy(built, "dynamic", tmp_path)
    for name in _train_shards(shard_dir):
        rewrite_members(shard_dir, name, lambda member, raw: b"\x93NUMPY\x01\x00" + raw[8:40]
                        if "input_ids" in member else raw)
    message = _one_line_error(shard_dir, 1)
    assert f"{shard_dir}/train-00000" in message and ".input_ids.npy.zst: not an .npy array" in message


def test_a_shard_outside_the_directory_is_refused_at_open(built, tmp_path):
    shard_dir = _copy(built, "dynamic", tmp_path)
    (tmp_path / "other").mkdir()
    shutil.move(shard_dir / "train-000000.tar", tmp_path / "other" / "train-000000.tar")
    edit_manifest(shard_dir, lambda m: m["shards"][0].update(name="../other/train-000000.tar"))
    with pytest.raises(DataError, match=r"manifest.json: shards\[0\].name: '../other/train-000000.tar' is not a "
                                        r"plain shard file name"):
        _first_batch(shard_dir, 0)


def test_train_with_loader_workers_reports_bad_data_in_one_line(built, tmp_path):
    """`pretrain train` (data.num_workers=1): the worker's DataError ends the run with exit 2 and one line."""
    shard_dir = _copy(built, "dynamic", tmp_path)
    for name in _train_shards(shard_dir):
        rewrite_shard(shard_dir, name, with_token(4000))
    overrides = [o for o in TINY if not o.startswith("data.num_workers")]
    run = launch(tmp_path / "run", overrides + [f"data.dir={shard_dir}", "data.num_workers=1",
                                                 f"data.tokenizer={built['dynamic'].parent / 'tokenizer'}",
                                                 "training.max_steps=2"], nproc=1)
    assert run.codes == [2], run.explain()
    errors = [line for line in run.logs[0].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.logs[0], run.explain()
    assert ": sample train-00000" in errors[0] and "input_ids: 4000 at position 1 is outside [0, 2048)" in errors[0]
