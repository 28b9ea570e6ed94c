"""``data_prep convert``: a format-1 directory (written here by a tiny v1 writer, as data_prep 0.1's
docs/data-format.md describes it: one tar member per field of a sample) becomes format 2 with the same
samples in the same order; v1 is never read as v2."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.errors import PrepError
from data_prep.report import verify_dir
from data_prep.shards import iter_split_samples, read_manifest
from data_prep.shards.convert import convert_dir
from tests.data_prep.conftest import run_shards, split_samples

V1_FIELDS = {"input_ids": "npy", "word_starts": "npy", "masked_lm_positions": "npy", "masked_lm_ids": "npy",
             "nsp_label": "cls", "sop_label": "cls"}


def write_v1_shard(path, samples: list[tuple[str, dict]]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            for field, value in sample.items():
                if V1_FIELDS[field] == "npy":
                    buf = io.BytesIO()
                    np.save(buf, value, allow_pickle=False)
                    data = buf.getvalue()
                else:
                    data = b"%d" % value
                info = tarfile.TarInfo(f"{key}.{field}.{V1_FIELDS[field]}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def v1_dir(v2: Path, out: Path) -> None:
    """The v1 directory of the samples of v2 directory ``v2``."""
    manifest = read_manifest(v2)
    out.mkdir()
    shutil.copytree(v2 / "tokenizer", out / "tokenizer")
    fmt = manifest["sample_format"]
    fields = [f for f in ("input_ids", "word_starts", "masked_lm_positions", "masked_lm_ids", "nsp_label", "sop_label")
              if f in fmt["columns"]]
    by_shard = {}
    for split in ("train", "val"):
        for _, name, key, sample in iter_split_samples(v2, manifest, split):
            by_shard.setdefault(name, []).append((key, sample))
    for entry in manifest["shards"]:
        data = write_v1_shard(out / entry["name"], by_shard[entry["name"]])
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    fmt["fields"] = [f"{f}.{V1_FIELDS[f]}" for f in fields]
    for key in ("columns", "chunk_samples", "compression"):
        del fmt[key]
    manifest.update(format_version=1, fingerprint="f" * 64)
    del manifest["dir"]
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("masking,objective", [("static", "nsp"), ("dynamic", "sop"), ("dynamic", "full-sentences")])
def test_convert_keeps_the_samples_and_their_order(en_corpus, tokenizer_dir, tmp_path, masking, objective):
    v2 = tmp_path / "v2"
    run_shards([en_corpus], tokenizer_dir, v2, shards__masking=masking, shards__objective=objective,
               shards__whole_word_mask=True)
    v1 = tmp_path / "v1"
    v1_dir(v2, v1)
    with pytest.raises(PrepError, match=f"version 1.*`python -m data_prep convert {v1} --out <new dir>`"):
        read_manifest(v1)
    out = tmp_path / "converted"
    assert main(["convert", str(v1), "--out", str(out)]) == 0
    converted = read_manifest(out)
    assert converted["converted_from"] == "f" * 64 and converted["sample_format"] == read_manifest(v2)["sample_format"]
    for split in ("train", "val"):
        got, want = list(split_samples(out, split)), list(split_samples(v2, split))
        assert len(got) == len(want) > 0
        assert all(g.keys() == w.keys() and all(np.array_equal(g[k], w[k]) for k in g) for g, w in zip(got, want))
    assert [e["sha256"] for e in converted["shards"]] == [e["sha256"] for e in read_manifest(v2)["shards"]]
    assert verify_dir(out) == ([], [])


def test_convert_refuses_a_non_empty_out_a_v2_source_and_a_damaged_v1_shard(en_corpus, tokenizer_dir, tmp_path):
    v2 = tmp_path / "v2"
    run_shards([en_corpus], tokenizer_dir, v2)
    with pytest.raises(PrepError, match="not a format-1 shard manifest"):
        convert_dir(v2, tmp_path / "x")
    v1 = tmp_path / "v1"
    v1_dir(v2, v1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(PrepError, match="busy: exists and is not empty"):
        convert_dir(v1, tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    shard = v1 / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PrepError, match="train-000001.tar: corrupted: sha256"):
        convert_dir(v1, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".tmp-*"))
