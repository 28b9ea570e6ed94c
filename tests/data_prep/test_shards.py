"""Shard writing primitives: npy bytes, tar headers, the writer (tarfile's bytes, atomic commit), reading back."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_prep.errors import PrepError
from data_prep.shards import (ShardWriter, bytes_rows, decode_fields, iter_tar_samples, npy_bytes, npy_rows, parse_key,
                              read_manifest, sample_key, shard_name)
from data_prep.shards.writer import tar_header


@pytest.mark.parametrize("arr", [np.arange(7, dtype=np.uint16), np.zeros(0, np.int32), np.ones(129, np.uint8),
                                 np.arange(3, dtype=np.int64)])
def test_npy_bytes_equal_np_save(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    assert npy_bytes(arr) == buf.getvalue()


@pytest.mark.parametrize("name,size", [("train-000000-000001.input_ids.npy", 384), ("k.cls", 1), ("x" * 100, 8 ** 11 - 1),
                                       ("val-000003-000017.masked_lm_positions.npy", 0)])
def test_tar_header_equals_tarfiles(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    with pytest.raises(ValueError):
        tar_header("y" * 101, 1)


def write_shard(path, samples):
    w = ShardWriter(path)
    for key, fields in samples:
        w.add(key, fields)
    return w.commit()


def test_writer_is_atomic_deterministic_and_readable(tmp_path):
    samples = [(sample_key("train", 3, i), {"input_ids.npy": npy_bytes(np.arange(i + 2, dtype=np.uint16)),
                                            "nsp_label.cls": b"%d" % (i % 2)}) for i in range(5)]
    a, b = tmp_path / "a" / shard_name("train", 3), tmp_path / "b" / shard_name("train", 3)
    a.parent.mkdir()
    b.parent.mkdir()
    ra, rb = write_shard(a, samples), write_shard(b, samples)
    assert ra == rb and a.read_bytes() == b.read_bytes() and ra["bytes"] == a.stat().st_size
    assert ra["samples"] == 5 and a.stat().st_size % tarfile.RECORDSIZE == 0
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["train-000003-000000.input_ids.npy", "train-000003-000000.nsp_label.cls"]
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    read = list(iter_tar_samples(a))
    assert [k for k, _ in read] == [k for k, _ in samples]
    decoded = decode_fields(read[4][1])
    assert decoded["input_ids"].tolist() == list(range(6)) and decoded["nsp_label"] == 0
    assert not list(a.parent.glob(".tmp-*"))


def test_abort_and_stale_temps(tmp_path):
    path = tmp_path / shard_name("val", 0)
    stale = tmp_path / f".tmp-{path.name}.99999"
    stale.write_bytes(b"left by a killed run")
    w = ShardWriter(path)
    assert not stale.exists()  # a new writer clears its own shard's leftovers
    w.add("val-000000-000000", {"input_ids.npy": npy_bytes(np.arange(3, dtype=np.uint16))})
    w.abort()
    assert not path.exists() and not list(tmp_path.iterdir())


def test_keys_and_manifest_errors(tmp_path):
    assert parse_key("train-000012-000345") == ("train", 12, 345)
    for key in ("other-1-2", "dir/train-000012-000345"):  # keys data_prep never writes
        with pytest.raises(ValueError):
            parse_key(key)
    with pytest.raises(PrepError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "bertforge-wds", "format_version": 99}')
    with pytest.raises(PrepError, match="format_version 99 is not supported"):
        read_manifest(tmp_path)


def tarfile_shard(path, samples) -> None:
    """The reference: stdlib tarfile writing the same members with the writer's fixed metadata."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("keys", [[sample_key("train", 7, i) for i in range(2500)],  # one key length, 3 chunks
                                  [sample_key("val", 0, 999_998 + i) for i in range(4)]])  # 6 then 7 digits
def test_add_rows_writes_the_bytes_tarfile_writes(tmp_path, keys):
    """The writer against stdlib tarfile, with rows of every layout: members of 0 bytes, exactly one
    block, several blocks, labels of several digits; one sample added alone, then a batch."""
    rng = np.random.default_rng(0)
    n = len(keys)
    ids = rng.integers(0, 30_000, size=(n, 600), dtype=np.uint16)
    id_lengths = rng.integers(0, 601, size=n)
    id_lengths[:3] = [0, 192, 600]  # 128 + 2 * 192 = 512 bytes: exactly one block
    flags = rng.integers(0, 2, size=(n, 600), dtype=np.uint8)
    labels = [b"%d" % v for v in rng.integers(0, 1000, size=n)]
    samples = [(key, {"input_ids.npy": npy_bytes(ids[r, :id_lengths[r]]),
                      "word_starts.npy": npy_bytes(flags[r, :id_lengths[r]]),
                      "label.cls": labels[r]}) for r, key in enumerate(keys)]
    tarfile_shard(tmp_path / "a.tar", samples)

    w = ShardWriter(tmp_path / "b.tar")
    w.add(*samples[0])
    w.add_rows(keys[1:], [("input_ids.npy", *[a[1:] for a in npy_rows(ids, id_lengths)]),
                          ("word_starts.npy", *[a[1:] for a in npy_rows(flags, id_lengths)]),
                          ("label.cls", *[a[1:] for a in bytes_rows(labels)])])
    record = w.commit()
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()
    assert record["samples"] == n and record["bytes"] == (tmp_path / "a.tar").stat().st_size


def test_names_longer_than_a_ustar_header_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "c.tar")
    with pytest.raises(ValueError, match="do not fit a USTAR header"):
        w.add("k" * 90, {"masked_lm_positions.npy": b""})
    w.abort()


def test_reader_groups_adjacent_members_by_webdatasets_key_rule(tmp_path):
    """A sample is a run of adjacent members with one key, the key being the member's directory and
    base name up to its first dot (webdataset's rule)."""
    members = [("a/x.input_ids.npy", b"1"), ("a/x.nsp_label.cls", b"0"), ("b/x.input_ids.npy", b"2"),
               ("y.input_ids.npy", b"3"), ("a/x.input_ids.npy", b"4")]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_tar_samples(tmp_path / "t.tar")) == [
        ("a/x", {"input_ids.npy": b"1", "nsp_label.cls": b"0"}), ("b/x", {"input_ids.npy": b"2"}),
        ("y", {"input_ids.npy": b"3"}), ("a/x", {"input_ids.npy": b"4"})]
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(PrepError, match="bad.tar: not a readable tar"):
        list(iter_tar_samples(tmp_path / "bad.tar"))
