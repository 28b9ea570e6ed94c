"""The shards stage end to end: formats, determinism across workers, WWM, splits, resume, nodes."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.errors import InputError, PrepError
from data_prep.loader import example_from_sample
from data_prep.pipeline import COMPRESSED_RATIO, input_mb, merge_node_manifests, pick_unit_mb
from data_prep.shards import read_manifest, split_info, wds_samples
from data_prep.vocab import read_tokenizer
from tests.data_prep.conftest import REPO, ZH_DOCS, english_docs, run_shards, shard_bytes, split_samples, write_lines

CLS, SEP = 2, 3


@pytest.fixture(scope="module")
def small_en(tmp_path_factory) -> Path:
    return write_lines(tmp_path_factory.mktemp("small") / "en.txt", english_docs(60_000))


@pytest.mark.parametrize("objective", ["nsp", "sop", "full-sentences"])
@pytest.mark.parametrize("masking", ["static", "dynamic"])
@pytest.mark.parametrize("whole_word", [False, True])
def test_objectives_and_masking_modes_read_with_stock_webdataset(small_en, tokenizer_dir, tmp_path, objective,
                                                                 masking, whole_word):
    """Every objective x masking x whole-word mode: stock webdataset with ``wds_samples`` gives the
    samples data_prep's own reader gives, with the fields the format says."""
    out = tmp_path / "shards"
    manifest = run_shards([small_en], tokenizer_dir, out, shards__objective=objective, shards__masking=masking,
                          shards__whole_word_mask=whole_word, shards__seq_len=64, shards__max_predictions=10)
    fmt = manifest["sample_format"]
    expected = ["input_ids"] + (["word_starts"] if whole_word and masking == "dynamic" else [])
    expected += ["masked_lm_positions", "masked_lm_ids"] if masking == "static" else []
    expected += {"nsp": ["nsp_label"], "sop": ["sop_label"]}.get(objective, [])
    columns = ["lengths", *expected]
    if masking == "static":
        columns.insert(columns.index("masked_lm_positions"), "masked_lm_counts")
    assert fmt["columns"] == columns and fmt["chunk_samples"] >= 1 and fmt["compression"]["codec"] == "zstd"
    assert fmt["token_dtype"] == "uint16"
    urls = [str(out / s["name"]) for s in manifest["shards"] if s["split"] == "train"]
    info = split_info(read_manifest(out), "train")
    own = list(split_samples(out))
    samples = tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).compose(wds_samples):
        assert sorted(k for k in sample if not k.startswith("__")) == sorted(expected)
        assert all(np.array_equal(sample[k], own[samples][k]) for k in expected)
        ids = sample["input_ids"]
        assert ids.dtype == np.uint16 and len(ids) <= 64 and ids[0] == CLS and ids[-1] == SEP
        example = example_from_sample(sample, info, seed=1, epoch=0, index=samples)
        types = example["token_type_ids"]
        assert types.dtype == np.uint8 and len(types) == len(ids)
        if objective == "full-sentences":
            assert not types.any() and "sentence_label" not in example
        else:
            first_sep = int(np.argmax(ids == SEP))
            assert 1 < first_sep < len(ids) - 2
            assert not types[: first_sep + 1].any() and types[first_sep + 1:].all()
            assert sample[f"{objective}_label"] in (0, 1)
            assert example["sentence_label"] == sample[f"{objective}_label"]
        if masking == "static":
            pos = sample["masked_lm_positions"]
            assert pos.dtype == np.uint16 and sample["masked_lm_ids"].dtype == np.uint16
            assert 1 <= len(pos) <= 10 and len(pos) == len(sample["masked_lm_ids"])
            assert np.array_equal(example["masked_lm_positions"], pos)
            assert np.all(ids[pos][ids[pos] != 4] != 0)  # never a [PAD]
        else:
            original = ids.astype(np.int64)
            assert np.array_equal(original[example["masked_lm_positions"]], example["masked_lm_labels"])
        assert 1 <= len(example["masked_lm_positions"]) <= 10
        assert not np.isin(example["masked_lm_labels"], [0, 1, 2, 3, 4]).any()
        samples += 1
        tokens += len(ids)
    assert samples == manifest["splits"]["train"]["samples"] == len(own) > 0
    assert tokens == manifest["splits"]["train"]["tokens"]


def test_shards_identical_for_one_and_two_workers(en_corpus, tokenizer_dir, tmp_path):
    flat = dict(shards__masking="static", shards__whole_word_mask=True, shards__dupe_factor=2)
    one = run_shards([en_corpus], tokenizer_dir, tmp_path / "w1", workers=1, **flat)
    two = run_shards([en_corpus], tokenizer_dir, tmp_path / "w2", workers=2, **flat)
    assert len(one["shards"]) >= 4
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert one == two
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()


def test_progress_off_a_terminal_is_plain_lines_on_stderr(en_corpus, tokenizer_dir, tmp_path, capsys, monkeypatch):
    """A SLURM log file is not a terminal: no tqdm bar there, a line per shard (Progress.interval_s apart)."""
    from data_prep.pipeline import Progress
    monkeypatch.setattr(Progress, "interval_s", 0.0)
    manifest = run_shards([en_corpus], tokenizer_dir, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"shards -> {tmp_path / 'out'}: ")]
    assert len(lines) == len(manifest["shards"]) and "\r" not in err
    assert lines[-1].split(": ")[1].startswith(f"{len(manifest['shards'])} shard(s) built, ")
    assert " tokens/s, " in lines[-1]


def test_unit_size_picked_for_small_corpora():
    # 10.8 MB of text (the State of the Union corpus) at 4 MB gave 3 units: nothing for a second worker
    assert pick_unit_mb(10.8, 0.01) == 1.0  # 10 units, 5 for each of 2 workers
    assert pick_unit_mb(40, 0.0) == 2.5  # 16 units
    assert pick_unit_mb(0.2, 0.0) == 1.0 and pick_unit_mb(5_000, 0.01) == 4.0  # within [1, 4] MB


def test_input_size_estimate_counts_compressed_files_more(tmp_path):
    text = "".join(f"line {i} of some text\n" for i in range(50_000)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(text))
    assert input_mb([tmp_path / "a.txt"]) == len(text) / 1e6
    assert input_mb([tmp_path / "b.txt.gz"]) == COMPRESSED_RATIO * (tmp_path / "b.txt.gz").stat().st_size / 1e6
    assert input_mb([tmp_path / "missing.txt", tmp_path / "a.txt"]) == len(text) / 1e6


def test_unit_size_when_not_given_is_picked_from_the_input_alone(en_corpus, tokenizer_dir, tmp_path, capsys):
    big = tmp_path / "big.txt"  # ~1.6 MB of distinct lines: at the least unit size (1 MB), 2 train units
    lines = [line for line in en_corpus.read_text().splitlines() if line.strip()]
    copies = -(-1_600_000 // en_corpus.stat().st_size)
    big.write_text("".join(f"Copy {k}. {line}\n" for k in range(copies) for line in lines))
    one = run_shards([big], tokenizer_dir, tmp_path / "one", shards__text_per_shard_mb=None)
    assert one["config"]["shards"]["text_per_shard_mb"] == 1.0 and one["units"]["train"] >= 2
    assert "work units of 1 MB of text (picked for 1." in capsys.readouterr().err
    # the same shards whatever the workers: the pick does not look at them
    two = run_shards([big], tokenizer_dir, tmp_path / "two", shards__text_per_shard_mb=None, workers=2)
    assert [(s["name"], s["sha256"]) for s in one["shards"]] == [(s["name"], s["sha256"]) for s in two["shards"]]


def test_english_whole_word_masking(small_en, tokenizer_dir, tmp_path):
    out = tmp_path / "wwm"
    run_shards([small_en], tokenizer_dir, out, shards__masking="static", shards__whole_word_mask=True)
    vocab = read_tokenizer(tokenizer_dir).get_vocab()
    is_piece = np.zeros(len(vocab), bool)
    is_piece[[i for t, i in vocab.items() if t.startswith("##")]] = True
    partial = multi = 0
    for s in split_samples(out, "train"):
        original = s["input_ids"].astype(np.int64)
        original[s["masked_lm_positions"]] = s["masked_lm_ids"]
        chosen = np.zeros(len(original), bool)
        chosen[s["masked_lm_positions"]] = True
        special = np.isin(original, [CLS, SEP])
        # A word starts at a non-## piece, or right after [CLS]/[SEP] (truncation can cut a word).
        word = np.cumsum(~is_piece[original] | np.r_[True, special[:-1]])
        for w in np.unique(word[chosen]):
            members = word == w
            partial += int(not chosen[members].all())
            multi += int(members.sum() > 1)
    assert partial == 0 and multi > 50  # many multi-piece words, each masked whole


def test_chinese_whole_word_masking_uses_jieba(zh_tokenizer_dir, tmp_path):
    corpus = write_lines(tmp_path / "zh.txt", ZH_DOCS * 2)
    tok = read_tokenizer(zh_tokenizer_dir)
    # jieba's words: 中华人民共和国 and 人工智能 are one word each, 自然语言处理 is 自然语言 + 处理.
    expected = {"中华人民共和国": [1, 0, 0, 0, 0, 0, 0], "人工智能": [1, 0, 0, 0], "自然语言处理": [1, 0, 0, 0, 1, 0]}
    patterns = {w: tok.encode(w, add_special_tokens=False).ids for w in expected}
    out = tmp_path / "zh"
    run_shards([corpus], zh_tokenizer_dir, out, shards__masking="dynamic", shards__whole_word_mask=True,
               clean__dedup=False, clean__min_doc_chars=5, shards__val_fraction=0.0)
    found = {w: 0 for w in expected}
    for s in split_samples(out, "train"):
        ids, starts = s["input_ids"].tolist(), s["word_starts"]
        assert starts.dtype == np.uint8 and len(starts) == len(ids)
        for w, pattern in patterns.items():
            for i in range(1, len(ids) - len(pattern) + 1):
                if ids[i: i + len(pattern)] == pattern:
                    found[w] += 1
                    assert starts[i: i + len(pattern)].tolist() == expected[w], w
    assert min(found.values()) >= 2
    static = tmp_path / "zh_static"
    run_shards([corpus], zh_tokenizer_dir, static, shards__masking="static", shards__whole_word_mask=True,
               clean__dedup=False, clean__min_doc_chars=5, shards__val_fraction=0.0, shards__dupe_factor=20)
    partial = whole = 0
    for s in split_samples(static, "train"):
        original = s["input_ids"].astype(np.int64)
        original[s["masked_lm_positions"]] = s["masked_lm_ids"]
        chosen = set(s["masked_lm_positions"].tolist())
        ids = original.tolist()
        pattern = patterns["中华人民共和国"]
        for i in range(1, len(ids) - len(pattern) + 1):
            if ids[i: i + len(pattern)] == pattern and ids[i - 1] != SEP and ids[i - 1] != CLS:
                hit = [p in chosen for p in range(i, i + len(pattern))]
                partial += int(any(hit) and not all(hit))
                whole += int(all(hit))
    assert partial == 0 and whole >= 1


def test_val_split_is_by_document(en_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "split"
    manifest = run_shards([en_corpus], tokenizer_dir, out, shards__val_fraction=0.2,
                          shards__objective="full-sentences")
    docs = {s: sum(sh["documents"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}
    total = docs["train"] + docs["val"]
    assert abs(docs["val"] / total - 0.2) < 4 * np.sqrt(0.2 * 0.8 / total)
    tok = read_tokenizer(tokenizer_dir)
    text = {s: " ".join(tok.decode(x["input_ids"].tolist()) for x in split_samples(out, s)) for s in ("train", "val")}
    val_docs = [d for d in english_docs() if len(d) > 200][:400]
    in_val = [d for d in val_docs if tok.decode(tok.encode(d[:150]).ids) in text["val"]]
    assert in_val and not any(tok.decode(tok.encode(d[:150]).ids) in text["train"] for d in in_val)


def test_rerun_skips_and_mismatches_are_refused(small_en, tokenizer_dir, zh_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "re"
    first = run_shards([small_en], tokenizer_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    capsys.readouterr()
    assert run_shards([small_en], tokenizer_dir, out) == first
    assert f"0 built, {len(before)} already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    with pytest.raises(PrepError, match="mismatched tokenizer"):
        run_shards([small_en], zh_tokenizer_dir, out)
    with pytest.raises(PrepError, match="other shard settings"):
        run_shards([small_en], tokenizer_dir, out, shards__seq_len=256)
    again = run_shards([small_en], tokenizer_dir, out, overwrite=True, shards__seq_len=256)
    assert again["sample_format"]["seq_len"] == 256


def test_changed_input_rebuilds_only_changed_units(en_corpus, tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "grow.txt"
    corpus.write_text(en_corpus.read_text())
    out = tmp_path / "grow"
    first = run_shards([corpus], tokenizer_dir, out)
    with open(corpus, "a") as f:
        f.write("A brand new final paragraph, long enough to be kept by the cleaner.\n")
    capsys.readouterr()
    # Another corpus is refused without --overwrite (test_integrity.py); with it, only the
    # units whose documents changed are rebuilt.
    second = run_shards([corpus], tokenizer_dir, out, overwrite=True)
    summary = capsys.readouterr().err
    changed = [a["name"] for a, b in zip(first["shards"], second["shards"]) if a["sha256"] != b["sha256"]]
    assert len(changed) == 1 and f"1 built, {len(first['shards']) - 1} already done" in summary


def test_stop_on_bad_input_keeps_shards_and_skip_resumes(en_corpus, tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text(en_corpus.read_text())
    (corpus / "b.txt").write_bytes(b"fine line of text here\n\xff\xfe broken line\nlast good line of text\n")
    out = tmp_path / "bad"
    with pytest.raises(InputError, match=r"b\.txt:2: invalid UTF-8"):
        run_shards([corpus], tokenizer_dir, out)
    written = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert written and not (out / "manifest.json").exists()
    capsys.readouterr()
    manifest = run_shards([corpus], tokenizer_dir, out, on_error="skip")
    assert "already done" in capsys.readouterr().err
    assert manifest["corpus"]["skipped_invalid_utf8"] == 1
    for name, data in written.items():
        assert (out / name).read_bytes() == data
    from data_prep.report import verify_dir
    assert verify_dir(out) == ([], [])


def test_node_slices_merge_to_the_single_node_result(en_corpus, tokenizer_dir, tmp_path):
    whole = run_shards([en_corpus], tokenizer_dir, tmp_path / "one")
    nodes = tmp_path / "nodes"
    parts = [run_shards([en_corpus], tokenizer_dir, nodes, num_nodes=3, node_rank=r) for r in (0, 2)]
    assert all(len(p["shards"]) < len(whole["shards"]) for p in parts)
    with pytest.raises(PrepError, match="ranks 0..2, found ranks \\[0, 2\\]"):
        merge_node_manifests(nodes)
    run_shards([en_corpus], tokenizer_dir, nodes, num_nodes=3, node_rank=1)
    merged = merge_node_manifests(nodes)
    assert {k: v for k, v in merged.items() if k != "nodes"} == whole
    assert shard_bytes(nodes) == shard_bytes(tmp_path / "one")


def test_resume_after_a_killed_run(tmp_path):
    corpus = write_lines(tmp_path / "en.txt", english_docs(500_000))
    tok = tmp_path / "tok"
    cli = [sys.executable, "-m", "data_prep"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(cli + ["vocab", "--input", str(corpus), "--vocab-size", "1000", "--out", str(tok)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    args = ["shards", "--input", str(corpus), "--tokenizer", str(tok), "--text-per-shard-mb", "0.02",
            "--masking", "static", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + args + ["--out", str(killed)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((killed / "progress").glob("*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cli + args + ["--out", str(killed)], env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=True)
    assert "already done (resumed)" in resumed.stderr and " 0 already done" not in resumed.stderr
    clean = tmp_path / "clean"
    subprocess.run(cli + args + ["--out", str(clean)], env=env, cwd=tmp_path, capture_output=True, check=True)
    assert shard_bytes(killed) == shard_bytes(clean)
    assert json.loads((killed / "manifest.json").read_text()) == json.loads((clean / "manifest.json").read_text())
    assert not list(killed.glob(".tmp-*"))


def test_gzip_input_and_dedup_counts_reach_the_manifest(tokenizer_dir, tmp_path):
    docs = english_docs(30_000)
    path = tmp_path / "dup.txt.gz"
    repeated = [d for d in docs if len(d) >= 40][:10]
    path.write_bytes(gzip.compress("\n".join(docs + repeated + ["tiny"]).encode()))
    manifest = run_shards([path], tokenizer_dir, tmp_path / "out")
    corpus = manifest["corpus"]
    assert corpus["dropped_duplicate"] == 10 and corpus["dropped_short"] >= 1
    assert corpus["docs_kept"] == sum(s["documents"] for s in manifest["shards"])


def test_literal_special_tokens_in_text_never_reach_samples(tokenizer_dir, tmp_path):
    docs = ["Some text with a literal [SEP] inside it. And a [MASK] and a [CLS] too, then [PAD] and [UNK]."] * 3
    docs = [f"{d} Document number {i} keeps going for a while." for i, d in enumerate(docs)]
    manifest = run_shards([write_lines(tmp_path / "t.txt", docs)], tokenizer_dir, tmp_path / "o",
                          shards__val_fraction=0.0)
    assert manifest["splits"]["train"]["samples"] > 0
    for s in split_samples(tmp_path / "o", "train"):
        ids = s["input_ids"]
        assert ids[0] == CLS and np.count_nonzero(ids == SEP) == 2 and not np.isin(ids, [0, 2, 4])[1:].any()


def test_a_stale_cached_tokenizer_hash_is_not_a_mismatch(small_en, tokenizer_dir, tmp_path):
    out = tmp_path / "stale"
    first = run_shards([small_en], tokenizer_dir, out)
    info_file = out / "tokenizer" / "vocab_info.json"
    info = json.loads(info_file.read_text())
    info["sha256"] = "0" * 64  # e.g. written by a version that hashed differently
    info_file.write_text(json.dumps(info))
    assert run_shards([small_en], tokenizer_dir, out) == first
    assert json.loads(info_file.read_text())["sha256"] == first["tokenizer"]["sha256"]


def test_blocks_fill_rows_whatever_the_workers(en_corpus, tokenizer_dir, tmp_path):
    """blocks: rows of exactly seq_len but a pass's last in each unit (at most dupe_factor a shard),
    the same bytes with 1 and 2 workers, static and dynamic whole-word masking, and ``stats`` shows a
    fill near 1, above full-sentences' on the same text."""
    from data_prep.report import collect_stats, format_stats

    seq_len = 64
    flat = dict(shards__objective="blocks", shards__masking="static", shards__whole_word_mask=True,
                shards__dupe_factor=2, shards__seq_len=seq_len)
    one = run_shards([en_corpus], tokenizer_dir, tmp_path / "w1", workers=1, **flat)
    two = run_shards([en_corpus], tokenizer_dir, tmp_path / "w2", workers=2, **flat)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2") and one == two
    short = {}
    for split in ("train", "val"):
        for sample in split_samples(tmp_path / "w1", split):
            ids = sample["input_ids"]
            assert ids[0] == CLS and ids[-1] == SEP and "nsp_label" not in sample and len(sample["masked_lm_ids"])
            short[split] = short.get(split, 0) + int(len(ids) < seq_len)
    for split in ("train", "val"):
        assert short.get(split, 0) <= 2 * sum(s["split"] == split for s in one["shards"])
    dyn = tmp_path / "dyn"
    run_shards([en_corpus], tokenizer_dir, dyn, **{**flat, "shards__masking": "dynamic", "shards__dupe_factor": 1})
    assert all(s["word_starts"][:2].all() for s in split_samples(dyn))  # [CLS] and a row's first token
    full = tmp_path / "full"
    run_shards([en_corpus], tokenizer_dir, full, shards__objective="full-sentences", shards__seq_len=seq_len)
    blocks, sentences = collect_stats(dyn), collect_stats(full)
    assert sentences["fill"] < blocks["fill"] and blocks["fill"] > 0.98
    assert f"blocks at seq_len {seq_len}: " in format_stats(blocks) and "fill" in format_stats(blocks)
