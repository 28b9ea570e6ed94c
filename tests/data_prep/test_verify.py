"""verify, stats and inspect on damaged or hostile shard directories: one clear line, exit 1.

``rewrite_shard`` and ``rewrite_members`` (also used by tests/pretrain/test_data_integrity.py) rewrite
a shard with bad values and record its new size and sha256 in the manifest, so that only the content
checks can catch it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.shards import ZSTD_LEVEL, ShardWriter, decode_shard, read_manifest, split_info
from data_prep.shards.reader import tar_members
from data_prep.shards.writer import tar_header
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


def _entry(shard_dir: Path, name: str) -> dict:
    manifest = read_manifest(shard_dir)
    return next(e for split in ("train", "val") for e in split_info(manifest, split)["shards"] if e["name"] == name)


def _record(shard_dir: Path, name: str, data: bytes) -> None:
    """Shard ``name`` replaced by ``data``, its manifest entry (and split total) given the new size and sha256."""
    (shard_dir / name).write_bytes(data)

    def record(manifest):
        entry = next(s for s in manifest["shards"] if s["name"] == name)
        manifest["splits"][entry["split"]]["bytes"] += len(data) - entry["bytes"]
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    edit_manifest(shard_dir, record)


def rewrite_shard(shard_dir: Path, name: str, mutate) -> None:
    """Rewrite shard ``name`` with ``mutate(columns)`` applied to its decoded columns ({column: writable
    array} of the whole shard: ``lengths``, ``input_ids``, ...), in place; its manifest entry gets the
    new size and sha256."""
    entry = _entry(shard_dir, name)
    shard = decode_shard((shard_dir / name).read_bytes(), entry, name)
    columns = {c: a.copy() for c, a in shard.columns.items()}
    mutate(columns)
    layout = entry["layout"]
    writer = ShardWriter(shard_dir / ".rewrite.tar", entry["split"], entry["index"], layout["columns"],
                         layout["chunk_samples"], ZSTD_LEVEL)
    writer.add(columns, len(columns["lengths"]))
    writer.commit()
    data = (shard_dir / ".rewrite.tar").read_bytes()
    (shard_dir / ".rewrite.tar").unlink()
    _record(shard_dir, name, data)


def rewrite_members(shard_dir: Path, name: str, mutate) -> None:
    """Rewrite shard ``name`` with ``mutate(member name, decompressed .npy bytes) -> bytes`` applied to
    every member (recompressed after); its manifest entry gets the new size and sha256."""
    out = []
    for member, raw in tar_members((shard_dir / name).read_bytes(), name):
        data = zstandard.ZstdCompressor().compress(mutate(member, zstandard.ZstdDecompressor().decompress(raw)))
        out.append(tar_header(member, len(data)) + data + bytes(-len(data) % 512))
    _record(shard_dir, name, b"".join(out) + bytes(1024))


def sample_slice(columns: dict, position: int, column: str = "input_ids") -> slice:
    """Where sample ``position``'s items of a ragged column are in the shard's columns."""
    counts = columns["masked_lm_counts" if column.startswith("masked_lm") else "lengths"].astype(np.int64)
    start = int(counts[:position].sum())
    return slice(start, start + int(counts[position]))


def with_token(token: int, position: int | None = None):
    """A mutation: input_ids[1] set to ``token`` in sample ``position`` (None: in every sample)."""
    def mutate(columns):
        for at in range(len(columns["lengths"])) if position is None else [position]:
            columns["input_ids"][sample_slice(columns, at).start + 1] = token
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
     "sample_format.columns: ['lengths', 'input_ids', 'nsp_label'] do not fit objective 'nsp', masking 'static'"),
    (lambda m: m["sample_format"].pop("chunk_samples"), "sample_format.chunk_samples: missing"),
    (lambda m: m["sample_format"].update(compression={"codec": "gzip"}),
     "sample_format.compression.codec: got 'gzip', expected 'zstd'"),
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
    assert f"FAIL: {dynamic / 'train-000001.tar'}: sample train-000001-000007: input_ids: 4000 at position 1 is outside " \
           "[0, 2048)" in proc.stdout
    assert data_prep("verify", "--quick", dynamic).returncode == 0     # sizes and hashes are right


def test_static_positions_and_labels_are_checked(static):
    def bad_positions(columns):
        columns["masked_lm_positions"][sample_slice(columns, 3, "masked_lm_positions")][-1] = 999
        columns["masked_lm_ids"][sample_slice(columns, 4, "masked_lm_ids")] = 9999
    rewrite_shard(static, "train-000000.tar", bad_positions)
    out = data_prep("verify", static).stdout
    assert "train-000000.tar: sample train-000000-000003: masked_lm_positions: 999 at position" in out
    line = single_error(data_prep("stats", static))
    assert "train-000000.tar: sample train-000000-000003: masked_lm_positions: 999 at position" in line

    def bad_labels(columns):
        columns["masked_lm_ids"][sample_slice(columns, 4, "masked_lm_ids")] = 9999
    rewrite_shard(static, "train-000001.tar", bad_labels)
    assert "train-000001.tar: sample train-000001-000004: masked_lm_ids: 9999 at position 0 is outside [0, 2048)" \
        in data_prep("verify", static).stdout


def test_a_broken_npy_header_or_zstd_frame_is_named(dynamic):
    rewrite_members(dynamic, "train-000000.tar",
                    lambda name, raw: b"\x93NUMPY\x01\x00" + raw[8:40] if "input_ids" in name else raw)
    for command in ("stats", "inspect"):
        line = single_error(data_prep(command, dynamic))
        assert "train-000000.tar: train-000000-000000.input_ids.npy.zst: not an .npy array" in line
    assert "train-000000.tar: train-000000-000000.input_ids.npy.zst: not an .npy array" in \
        data_prep("verify", dynamic).stdout


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
    _damage_header(dynamic / "train-000000.tar", member=1)
    for command in ("stats", "inspect"):
        line = single_error(data_prep(command, dynamic))
        assert f"{dynamic / 'train-000000.tar'}: corrupted: sha256" in line


def test_stats_refuses_a_shard_that_holds_fewer_samples_than_the_manifest(dynamic):
    edit_manifest(dynamic, lambda m: m["shards"][0].update(samples=m["shards"][0]["samples"] + 1))
    line = single_error(data_prep("stats", dynamic))
    assert "train-000000.tar: chunk train-000000-000000: lengths holds" in line and "expected" in line
