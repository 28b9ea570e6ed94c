"""verify, stats and inspect on damaged or hostile shard directories: one clear line, exit 1.

``rewrite_shard`` (also used by tests/pretrain/test_data_integrity.py) rewrites a shard with bad
values and records its new size and sha256 in the manifest, so that only the content checks can
catch it.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import ShardWriter, iter_tar_samples, npy_bytes
from tests.pretrain.training_helpers import REPO, build_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {masking: build_shards(root / masking, masking, lines=600) / "shards" for masking in ("dynamic", "static")}


@pytest.fixture
def dynamic(built, tmp_path):
    shutil.copytree(built["dynamic"], tmp_path / "shards")
    return tmp_path / "shards"


@pytest.fixture
def static(built, tmp_path):
    shutil.copytree(built["static"], tmp_path / "shards")
    return tmp_path / "shards"


def data_prep(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


def edit_manifest(shard_dir: Path, edit) -> None:
    path = shard_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_shard(shard_dir: Path, name: str, mutate) -> None:
    """Rewrite shard ``name`` with ``mutate(position, members) -> members`` applied to each sample's raw
    members ({extension: bytes}); its manifest entry gets the new size and sha256."""
    samples = list(iter_tar_samples(shard_dir / name))
    writer = ShardWriter(shard_dir / name)
    for position, (key, members) in enumerate(samples):
        writer.add(key, mutate(position, dict(members)))
    written = writer.commit()

    def record(manifest):
        entry = next(s for s in manifest["shards"] if s["name"] == name)
        entry.update(bytes=written["bytes"], sha256=written["sha256"])
    edit_manifest(shard_dir, record)


def with_token(token: int, position: int | None = None, dtype=np.uint16):
    """A mutation: input_ids[1] set to ``token`` in sample ``position`` (None: in every sample)."""
    def mutate(at, members):
        if position is None or at == position:
            ids = np.load(io.BytesIO(members["input_ids.npy"])).astype(dtype)
            ids[1] = token
            members["input_ids.npy"] = npy_bytes(ids)
        return members
    return mutate


def single_error(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed command (and no traceback)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- manifest: shard names confined to the directory ------------------------------------------
def test_a_shard_name_outside_the_directory_is_refused(dynamic):
    other = dynamic.parent / "other"
    other.mkdir()
    shutil.move(dynamic / "train-000000.tar", other / "train-000000.tar")
    edit_manifest(dynamic, lambda m: m["shards"][0].update(name="../other/train-000000.tar"))
    line = single_error(data_prep("verify", dynamic))
    assert "manifest.json: shards[0].name" in line and "'../other/train-000000.tar'" in line
    assert "plain shard file name" in line


def test_a_shard_symlinked_outside_the_directory_is_refused(dynamic):
    other = dynamic.parent / "other"
    other.mkdir()
    shutil.move(dynamic / "train-000000.tar", other / "train-000000.tar")
    (dynamic / "train-000000.tar").symlink_to(other / "train-000000.tar")
    line = single_error(data_prep("verify", dynamic))
    assert "train-000000.tar" in line and "outside" in line


# --- manifest: semantic fields, missing keys --------------------------------------------------
@pytest.mark.parametrize("edit,expected", [
    (lambda m: m["tokenizer"]["special_ids"].update(mask=5000),
     "tokenizer.special_ids.mask: 5000 is not below tokenizer.vocab_size (2048)"),
    (lambda m: m["sample_format"].update(objective="sop"),
     "sample_format.sentence_label_key: 'nsp_label' does not fit objective 'sop' (expected 'sop_label')"),
    (lambda m: m["sample_format"].update(masking="static"),
     "sample_format.fields: ['input_ids.npy', 'nsp_label.cls'] do not fit objective 'nsp', masking 'static'"),
    (lambda m: m["sample_format"].update(seq_len=0), "sample_format.seq_len: got 0, expected an integer in [8, 65535]"),
    (lambda m: m["sample_format"].update(max_predictions=500),
     "sample_format.max_predictions: got 500, expected an integer in [1, 128]"),
    (lambda m: m["shards"][1].update(samples=-3), "shards[1].samples: got -3, expected an integer >= 0"),
    (lambda m: m["shards"][1].update(name="train-000000.tar"),
     "shards[1].name: 'train-000000.tar' does not fit its split and index (expected 'train-000001.tar')"),
    (lambda m: m["sample_format"].pop("seq_len"), "sample_format.seq_len: missing"),
    (lambda m: m.pop("tokenizer"), "tokenizer: missing"),
    (lambda m: m["shards"][2].pop("sha256"), "shards[2].sha256: missing"),
    (lambda m: m.update(shards={"a": 1}), "shards: got a dict, expected a list"),
])
def test_manifest_fields_are_checked_with_one_line_naming_the_key(dynamic, edit, expected):
    edit_manifest(dynamic, edit)
    line = single_error(data_prep("verify", dynamic))
    assert line.startswith(f"error: {dynamic / 'manifest.json'}: ") and expected in line


def test_split_totals_that_disagree_with_the_shards_fail_verify(dynamic):
    edit_manifest(dynamic, lambda m: m["splits"]["train"].update(samples=1))
    proc = data_prep("verify", "--quick", dynamic)
    assert proc.returncode == 1
    assert "FAIL: manifest.json: splits.train.samples is 1 but its shards hold" in proc.stdout


# --- sample values: a correctly hashed shard with bad content ---------------------------------
def test_verify_names_shard_and_sample_of_an_out_of_range_token(dynamic):
    rewrite_shard(dynamic, "train-000001.tar", with_token(4000, position=7))
    proc = data_prep("verify", dynamic)
    assert proc.returncode == 1
    assert "FAIL: train-000001.tar: sample train-000001-000007: input_ids: 4000 at position 1 is outside " \
           "[0, 2048)" in proc.stdout
    assert data_prep("verify", "--quick", dynamic).returncode == 0     # sizes and hashes are right


def test_static_positions_and_labels_are_checked(static):
    def bad_positions(at, members):
        if at == 3:
            members["masked_lm_positions.npy"] = npy_bytes(np.array([1, 2, 999], dtype=np.uint16))
            members["masked_lm_ids.npy"] = npy_bytes(np.array([5, 6, 7], dtype=np.uint16))
        if at == 4:
            members["masked_lm_ids.npy"] = npy_bytes(np.full(
                len(np.load(io.BytesIO(members["masked_lm_ids.npy"]))), 9999, dtype=np.uint16))
        return members
    rewrite_shard(static, "train-000000.tar", bad_positions)
    out = data_prep("verify", static).stdout
    assert "train-000000.tar: sample train-000000-000003: masked_lm_positions: 999 at position 2 is outside [0, " in out
    line = single_error(data_prep("stats", static))
    assert "train-000000.tar: sample train-000000-000003: masked_lm_positions: 999 at position 2 is outside [0, " in line


def test_a_broken_npy_header_is_named(dynamic):
    def broken(at, members):
        if at == 2:
            members["input_ids.npy"] = b"\x93NUMPY\x01\x00" + members["input_ids.npy"][8:40]
        return members
    rewrite_shard(dynamic, "train-000000.tar", broken)
    for command in ("stats", "inspect"):
        line = single_error(data_prep(command, dynamic))
        assert "train-000000.tar: sample train-000000-000002: input_ids.npy: cannot decode" in line


# --- stats / inspect on damaged shards --------------------------------------------------------
def _damage_header(shard: Path, member: int) -> None:
    """Garble the tar header of member ``member``: tarfile then ends the archive there, silently."""
    import tarfile

    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member].offset
    data = bytearray(shard.read_bytes())
    data[offset:offset + 100] = b"\xff" * 100
    shard.write_bytes(bytes(data))


def test_stats_and_inspect_refuse_a_damaged_shard(dynamic):
    _damage_header(dynamic / "train-000000.tar", member=10)
    for command in ("stats", "inspect"):
        line = single_error(data_prep(command, dynamic))
        assert f"{dynamic / 'train-000000.tar'}: sha256 differs from the manifest" in line
        assert f"python -m data_prep verify {dynamic}" in line


def test_stats_refuses_a_shard_that_holds_fewer_samples_than_the_manifest(dynamic):
    edit_manifest(dynamic, lambda m: m["shards"][0].update(samples=m["shards"][0]["samples"] + 1))
    line = single_error(data_prep("stats", dynamic))
    assert "train-000000.tar: holds" in line and "samples but the manifest says" in line
