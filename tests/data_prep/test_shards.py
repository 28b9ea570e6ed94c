"""Shard format v2 primitives: the writer (columns in chunks, atomic, deterministic), ``decode_shard``
and its refusals (one-line PrepErrors), ``wds_samples`` under stock webdataset, manifest versions."""
from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pytest
import zstandard

from data_prep.errors import PrepError
from data_prep.shards import (ShardWriter, decode_shard, parse_key, parse_manifest, read_manifest, sample_key,
                              shard_name)
from data_prep.shards.format import COUNT_COLUMNS, sample_columns
from data_prep.shards.writer import npy_bytes, tar_header

COLUMNS = {"lengths": "uint16", "input_ids": "uint16", "word_starts": "uint8", "nsp_label": "uint8"}
LAYOUT = {"columns": COLUMNS, "chunk_samples": 3, "seq_len": 16, "max_predictions": 4, "vocab_size": 100}


@pytest.mark.parametrize("arr", [np.arange(7, dtype=np.uint16), np.zeros(0, np.int32), np.ones(129, np.uint8)])
def test_npy_bytes_equal_np_save(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    assert npy_bytes(arr) == buf.getvalue()


def samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 17))
        out.append({"input_ids": rng.integers(0, 100, length).astype(np.uint16),
                    "word_starts": rng.integers(0, 2, length).astype(np.uint8), "nsp_label": int(rng.integers(0, 2))})
    return out


def batch(chunk: list[dict]) -> dict:
    return {"lengths": np.array([len(s["input_ids"]) for s in chunk]),
            "input_ids": np.concatenate([s["input_ids"] for s in chunk]),
            "word_starts": np.concatenate([s["word_starts"] for s in chunk]),
            "nsp_label": np.array([s["nsp_label"] for s in chunk])}


def write(path, data: list[dict], batch_sizes=(4, 1, 3)) -> dict:
    """``data`` written in batches of ``batch_sizes`` (repeated), chunks of 3: batches cross chunks."""
    w = ShardWriter(path, "train", 3, COLUMNS, chunk_samples=3, level=3)
    at, k = 0, 0
    while at < len(data):
        size = batch_sizes[k % len(batch_sizes)]
        w.add(batch(data[at:at + size]), len(data[at:at + size]))
        at, k = at + size, k + 1
    return w.commit()


def entry(record: dict, tokens: int | None = None) -> dict:
    out = {"name": shard_name("train", 3), "split": "train", "index": 3, "layout": LAYOUT, **record}
    if tokens is not None:
        out["tokens"] = tokens
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_writer_round_trip_is_atomic_deterministic_and_a_plain_tar(tmp_path):
    data = samples(11)
    a, b = tmp_path / "a" / shard_name("train", 3), tmp_path / "b" / shard_name("train", 3)
    a.parent.mkdir()
    b.parent.mkdir()
    ra, rb = write(a, data), write(b, data, batch_sizes=(11,))
    assert ra == rb and a.read_bytes() == b.read_bytes() and ra["bytes"] == a.stat().st_size and ra["samples"] == 11
    with tarfile.open(a) as tar:
        members = tar.getmembers()
        first = tar.extractfile(members[1]).read()
    assert [m.name for m in members[:5]] == [
        "train-000003-000000.lengths.npy.zst", "train-000003-000000.input_ids.npy.zst",
        "train-000003-000000.word_starts.npy.zst", "train-000003-000000.nsp_label.npy.zst",
        "train-000003-000003.lengths.npy.zst"]
    assert len(members) == 4 * 4 and all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    # a member is a zstd frame of an .npy file: readable with zstandard + numpy alone
    ids = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(first)), allow_pickle=False)
    assert ids.tolist() == np.concatenate([s["input_ids"] for s in data[:3]]).tolist()
    shard = decode_shard(a.read_bytes(), entry(ra, sum(len(s["input_ids"]) for s in data)), "a")
    assert len(shard) == 11 and shard.key(10) == sample_key("train", 3, 10) and shard.nbytes > 0
    assert all(same(shard.sample(i), data[i]) for i in range(11))
    assert isinstance(shard.sample(0)["nsp_label"], int)
    assert not list(a.parent.glob(".tmp-*"))


def test_abort_and_stale_temps(tmp_path):
    path = tmp_path / shard_name("val", 0)
    stale = tmp_path / f".tmp-{path.name}.99999"
    stale.write_bytes(b"left by a killed run")
    w = ShardWriter(path, "val", 0, COLUMNS, chunk_samples=3, level=3)
    assert not stale.exists()  # a new writer clears its own shard's leftovers
    w.add(batch(samples(2)), 2)
    w.abort()
    assert not path.exists() and not list(tmp_path.iterdir())


def member(name: str, data: bytes) -> bytes:
    return tar_header(name, len(data)) + data + bytes(-len(data) % 512)


def frame(arr: np.ndarray) -> bytes:
    return zstandard.ZstdCompressor().compress(npy_bytes(arr))


def one_chunk(**replace) -> tuple[bytes, dict]:
    """A shard of one chunk (3 samples) with some members' data replaced, and its entry."""
    cols = batch(samples(3))
    body = b"".join(member(f"train-000003-000000.{c}.npy.zst",
                           replace.get(c, frame(cols[c].astype(COLUMNS[c])))) for c in COLUMNS)
    return body + bytes(1024), entry({"samples": 3})


@pytest.mark.parametrize("damage,message", [
    (lambda: one_chunk(input_ids=b"not zstd at all"), "input_ids.npy.zst: not a zstd frame"),
    (lambda: one_chunk(input_ids=frame(np.zeros(2, np.uint16))), "input_ids holds 2 items, expected"),
    (lambda: one_chunk(nsp_label=frame(np.array([0, 1, 2], np.uint8))), r"sample train-000003-000002: nsp_label: got 2, expected \[0, 2\)"),
    (lambda: one_chunk(nsp_label=frame(np.zeros(3, np.int64))), "a int64 array of shape"),
    (lambda: one_chunk(input_ids=zstandard.ZstdCompressor().compress(bytes(10_000))), "declares a content size"),
    (lambda: one_chunk(input_ids=zstandard.ZstdCompressor(write_content_size=False).compress(b"x")),
     "declares no content size"),
    (lambda: one_chunk(input_ids=frame(np.zeros(3, np.uint16))[:-4]), "input_ids.npy.zst: cannot decompress"),
    (lambda: (one_chunk()[0][:2000], one_chunk()[1]), "truncated tar"),
    (lambda: (b"x" * 2048, one_chunk()[1]), "not a readable tar"),
    (lambda: (one_chunk()[0], entry({"samples": 4})), "4 members, expected 8"),
    (lambda: (one_chunk()[0], entry({"samples": 2})), "lengths holds 3 items, expected 2"),
])
def test_damaged_shards_give_one_line_errors(damage, message):
    data, shard_entry = damage()
    with pytest.raises(PrepError, match=message) as err:
        decode_shard(data, shard_entry, "dir/train-000003.tar")
    assert str(err.value).startswith("dir/train-000003.tar: ") and "\n" not in str(err.value)


def test_stock_webdataset_reads_the_shards_with_wds_samples(tmp_path):
    wds = pytest.importorskip("webdataset")
    data = samples(7)
    write(tmp_path / shard_name("train", 3), data)
    # the lines of docs/data-format.md, "Stock WebDataset"
    from data_prep.shards import wds_samples
    dataset = wds.WebDataset([str(tmp_path / "train-000003.tar")], shardshuffle=False).compose(wds_samples)
    got = list(dataset)
    assert [s["__key__"] for s in got] == [sample_key("train", 3, i) for i in range(7)]
    assert all(same({k: v for k, v in g.items() if not k.startswith("__")}, d) for g, d in zip(got, data))
    with pytest.raises(PrepError, match="not a data_prep chunk key"):
        list(wds_samples([{"__key__": "x", "__url__": "u"}]))


def test_keys_and_manifest_versions(tmp_path):
    assert parse_key("train-000012-000345") == ("train", 12, 345)
    for key in ("other-1-2", "dir/train-000012-000345"):  # keys data_prep never writes
        with pytest.raises(ValueError):
            parse_key(key)
    with pytest.raises(PrepError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "bertforge-wds", "format_version": 99}')
    with pytest.raises(PrepError, match="format_version 99 is not supported"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "bertforge-wds", "format_version": 1}')
    with pytest.raises(PrepError, match=f"version 1.*python -m data_prep convert {tmp_path} --out <new dir>"):
        read_manifest(tmp_path)
    with pytest.raises(PrepError, match="http://h/d/manifest.json: not valid JSON"):
        parse_manifest(b"{", "http://h/d/manifest.json")
    with pytest.raises(PrepError, match=r"^m.json: \d+ problems: fingerprint: missing"):
        parse_manifest(json.dumps({"format": "bertforge-wds", "format_version": 2, "shards": [{"name": "../x.tar"}]}),
                       "m.json")


def test_decoded_memory_counts_its_offsets(tmp_path):
    """Offsets and labels are numpy arrays (not Python lists, +48 B a sample), counted in nbytes."""
    data = samples(11)
    record = write(tmp_path / shard_name("train", 3), data)
    shard = decode_shard((tmp_path / shard_name("train", 3)).read_bytes(), entry(record), "a")
    offsets = sum(8 * (len(shard) + 1) for c in COUNT_COLUMNS if c in shard.columns)
    assert shard.nbytes == sum(c.nbytes for c in shard.columns.values()) + offsets
    assert all(not isinstance(v, list) for v in (shard._offsets["lengths"], shard._labels[0][1]))
    assert all(same(shard.sample(i), data[i]) for i in range(11))
    assert type(shard.sample(3)["nsp_label"]) is int


def manifest_bytes(record: dict, chunk_samples: int = 3, **shard) -> bytes:
    """A format-2 manifest of COLUMNS' layout listing the shard of ``record`` (``shard`` replacing its fields)."""
    return json.dumps({
        "format": "bertforge-wds", "format_version": 2, "fingerprint": "f", "seed": 1,
        "tokenizer": {"sha256": "0" * 64, "dir": "tokenizer", "vocab_size": 100,
                      "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}},
        "sample_format": {"objective": "nsp", "masking": "dynamic", "whole_word_mask": True, "seq_len": 16,
                          "max_predictions": 4, "masked_lm_prob": 0.15, "token_dtype": "uint16",
                          "chunk_samples": chunk_samples, "compression": {"codec": "zstd", "level": 3},
                          "sentence_label_key": "nsp_label", "columns": sample_columns("nsp", "dynamic", True)},
        "splits": {"train": {}, "val": {}},
        "shards": [{"name": shard_name("train", 3), "split": "train", "index": 3, **record, **shard}]}).encode()


def test_counts_the_bytes_cannot_hold_are_refused_fast(tmp_path):
    """A manifest claiming 10**9 samples in chunks of 1 for a 1 KB shard must not make a reader size
    anything by the claim (the loader's sample order, decode_shard's member names)."""
    path = tmp_path / shard_name("train", 3)
    record = write(path, samples(11))
    record["tokens"] = decode_shard(path.read_bytes(), entry(record), "a").columns["lengths"].sum().item()
    assert parse_manifest(manifest_bytes(record), "m.json")["shards"][0]["samples"] == 11
    assert record["samples"] <= -(-record["bytes"] // (1024 * 4)) * 3  # the bound holds for a real shard
    cases = [
        (dict(chunk_samples=1, samples=10 ** 9, bytes=1024),
         r"shards\[0\].samples: 1,000,000,000 cannot fit in 1,024 bytes \(at most 1 in chunks of 1: each of a "
         r"chunk's 4 columns takes at least 1024 bytes\)$"),
        (dict(tokens=11 * 16 + 1), r"shards\[0\].tokens: 177 for 11 samples, expected 1 to seq_len \(16\)"),
        (dict(tokens=10), r"shards\[0\].tokens: 10 for 11 samples"),
        (dict(chunk_samples=1 << 24), r"sample_format.chunk_samples: got 16777216, expected an integer in "
                                      r"\[1, 1048576\]$"),
    ]
    for edit, message in cases:
        chunk = edit.pop("chunk_samples", 3)
        start = time.monotonic()
        with pytest.raises(PrepError, match=r"^m.json: " + message) as err:
            parse_manifest(manifest_bytes(record, chunk, **edit), "m.json")
        assert "\n" not in str(err.value) and time.monotonic() - start < 1
    # decode_shard, handed such an entry anyway, does not build a name per claimed member
    start = time.monotonic()
    with pytest.raises(PrepError, match=r"^a: member 4 is 'train-000003-000003.lengths.npy.zst', expected "
                                        r"'train-000003-000001.lengths.npy.zst'$"):
        decode_shard(path.read_bytes(), {**entry(record), "samples": 10 ** 9,
                                         "layout": {**LAYOUT, "chunk_samples": 1}}, "a")
    assert time.monotonic() - start < 1
    with pytest.raises(PrepError, match=r"^a: 16 members, expected 1333333336 for 1000000000 samples"):
        decode_shard(path.read_bytes(), {**entry(record), "samples": 10 ** 9}, "a")
    assert time.monotonic() - start < 1


def test_converted_from_is_a_sha256_when_present(tmp_path):
    record = write(tmp_path / shard_name("train", 3), samples(11))
    record["tokens"] = decode_shard((tmp_path / shard_name("train", 3)).read_bytes(), entry(record),
                                    "a").columns["lengths"].sum().item()
    good = json.loads(manifest_bytes(record))
    assert "converted_from" not in parse_manifest(json.dumps(good).encode(), "m.json")
    converted = parse_manifest(json.dumps({**good, "converted_from": "a" * 64}).encode(), "m.json")
    assert converted["converted_from"] == "a" * 64
    for bad, expected in ((7, "got an integer, expected a string"), ("xyz", "got 'xyz', expected a sha256")):
        with pytest.raises(PrepError, match=rf"^m.json: converted_from: {expected}"):
            parse_manifest(json.dumps({**good, "converted_from": bad}).encode(), "m.json")
