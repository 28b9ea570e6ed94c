"""Statistical checks on real text (../shared/corpora): masking rate, 80/10/10, NSP/SOP balance, WWM."""
from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest

from data_prep.loader import example_from_sample
from data_prep.masking import MaskingConfig, budgets
from data_prep.shards import read_manifest, split_info
from data_prep.vocab import save_tokenizer_dir, train_wordpiece
from tests.data_prep.conftest import run_shards, split_samples, write_lines


def head_lines(path, n_chars: int) -> list[str]:
    out, size = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\n"))
                size += len(line)
                if size >= n_chars:
                    break
    return out


def within(value: float, expected: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(value - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


@pytest.fixture(scope="module")
def english_static(corpora_dir, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_en")
    # Austen paragraphs (short documents) and State-of-the-Union addresses (very long lines).
    corpus = write_lines(root / "en.txt", head_lines(corpora_dir / "en_austen.txt.gz", 500_000) +
                         head_lines(corpora_dir / "en_sotu.txt.gz", 500_000))
    out = root / "shards"
    run_shards([corpus], tokenizer_dir, out, shards__masking="static", shards__seq_len=128,
               shards__text_per_shard_mb=0.25, shards__val_fraction=0.02)
    return out


def test_static_masking_rate_and_80_10_10_on_real_english(english_static):
    info = split_info(read_manifest(english_static), "train")
    config = MaskingConfig(vocab_size=info["vocab_size"], mask_id=4, special_ids=(0, 1, 2, 3, 4))
    maskable = masked = as_mask = kept = 0
    for s in split_samples(english_static, "train"):
        original = s["input_ids"].astype(np.int64)
        original[s["masked_lm_positions"]] = s["masked_lm_ids"]
        n = int(np.count_nonzero(original > 4))
        k = len(s["masked_lm_positions"])
        assert k == budgets([n], config)[0]  # round(15%), at least 1, at most max_predictions
        maskable += n
        masked += k
        shown = s["input_ids"][s["masked_lm_positions"]]
        as_mask += int(np.count_nonzero(shown == 4))
        kept += int(np.count_nonzero(shown == s["masked_lm_ids"]))
    assert masked > 20_000
    assert abs(masked / maskable - 0.15) < 0.003  # only per-sample rounding moves it off 15%
    assert within(as_mask / masked, 0.8, masked)
    assert within(kept / masked, 0.1 + 0.1 / info["vocab_size"], masked)


def test_nsp_balance_on_real_english(english_static):
    labels = [s["nsp_label"] for s in split_samples(english_static, "train")]
    assert len(labels) > 2000 and within(float(np.mean(labels)), 0.5, len(labels))


def test_dynamic_masking_on_real_english_changes_by_epoch(corpora_dir, tokenizer_dir, tmp_path):
    corpus = write_lines(tmp_path / "en.txt", head_lines(corpora_dir / "en_bible_web.txt.gz", 300_000))
    out = tmp_path / "dyn"
    run_shards([corpus], tokenizer_dir, out, shards__objective="sop", shards__masking="dynamic",
               shards__text_per_shard_mb=0.1)
    manifest = read_manifest(out)
    info = split_info(manifest, "train")
    same = rate_num = rate_den = 0
    labels = []
    for i, s in enumerate(split_samples(out, "train")):
        e0 = example_from_sample(s, info, seed=5, epoch=0, index=i)
        e1 = example_from_sample(s, info, seed=5, epoch=1, index=i)
        again = example_from_sample(s, info, seed=5, epoch=0, index=i)
        assert np.array_equal(e0["input_ids"], again["input_ids"])  # a resumed run masks identically
        same += int(np.array_equal(e0["masked_lm_positions"], e1["masked_lm_positions"]))
        rate_num += len(e0["masked_lm_positions"])
        rate_den += int(np.count_nonzero(s["input_ids"] > 4))
        labels.append(e0["sentence_label"])
    assert same < 0.05 * len(labels)
    assert abs(rate_num / rate_den - 0.15) < 0.003
    assert within(float(np.mean(labels)), 0.5, len(labels))  # SOP: swapped half of the time


def test_chinese_whole_word_masking_on_real_text(corpora_dir, tmp_path):
    docs = head_lines(corpora_dir / "zh_peoplesdaily1998.txt.gz", 100_000)
    tok_dir = tmp_path / "tok"
    save_tokenizer_dir(train_wordpiece(lambda: iter(docs), 4000, lowercase=True), tok_dir)
    corpus = write_lines(tmp_path / "zh.txt", docs)
    out = tmp_path / "zh"
    run_shards([corpus], tok_dir, out, shards__masking="dynamic", shards__whole_word_mask=True,
               shards__text_per_shard_mb=0.05, clean__min_doc_chars=10)
    info = split_info(read_manifest(out), "train")
    masked = maskable = multi_char_words = labels = ones = 0
    for i, s in enumerate(split_samples(out, "train")):
        ex = example_from_sample(s, info, seed=1, epoch=0, index=i)
        starts = s["word_starts"].astype(bool) | (s["input_ids"] <= 4)
        word = np.cumsum(starts | np.r_[True, s["input_ids"][:-1] <= 4])
        chosen = np.zeros(len(word), bool)
        chosen[ex["masked_lm_positions"]] = True
        for w in np.unique(word[chosen]):
            members = (word == w) & (s["input_ids"] > 4)
            assert chosen[members].all()
            multi_char_words += int(members.sum() > 1)
        masked += int(chosen.sum())
        maskable += int(np.count_nonzero(s["input_ids"] > 4))
        labels += 1
        ones += ex["sentence_label"]
    assert multi_char_words > 600  # jieba joined characters into words, and they were masked whole
    assert 0.13 < masked / maskable <= 0.152  # whole words can leave the budget a little short
    assert within(ones / labels, 0.5, labels)


def test_zh_reviews_read_clean_and_shard(corpora_dir, tmp_path):
    docs = list(itertools.islice(head_lines(corpora_dir / "zh_reviews.txt.gz", 60_000), 400))
    tok_dir = tmp_path / "tok"
    save_tokenizer_dir(train_wordpiece(lambda: iter(docs), 2000, lowercase=True), tok_dir)
    manifest = run_shards([write_lines(tmp_path / "r.txt", docs)], tok_dir, tmp_path / "out",
                          shards__objective="full-sentences")
    assert manifest["splits"]["train"]["samples"] > 50
    fill = manifest["splits"]["train"]["tokens"] / (manifest["splits"]["train"]["samples"] * 128)
    # Whole sentences only: a sentence that does not fit starts the next sample (RoBERTa), so the
    # waste is about half a sentence per sample; these reviews have long sentences.
    assert fill > 0.75
