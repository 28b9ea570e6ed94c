"""The shared masking function: rates, 80/10/10, caps, specials, whole words, seeding."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.masking import MaskingConfig, budgets, continuation_table, mask_sample, mask_tokens, masking_rng

PAD, UNK, CLS, SEP, MASK = range(5)
CONFIG = MaskingConfig(vocab_size=1000, mask_id=MASK, special_ids=(PAD, UNK, CLS, SEP, MASK), max_predictions=20)


def sample(rng, n=128, sep_at=60):
    ids = rng.integers(5, 1000, n).astype(np.uint16)
    ids[0], ids[sep_at], ids[-1] = CLS, SEP, SEP
    return ids


def test_counts_specials_and_labels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(4, 129))
        ids = sample(rng, n, sep_at=n // 2)
        out = mask_tokens(ids, rng, CONFIG)
        assert len(out.masked_lm_positions) == budgets([n - 3], CONFIG)[0]
        assert len(out.masked_lm_positions) == min(20, max(1, int((n - 3) * 0.15 + 0.5)))
        assert np.all(np.diff(out.masked_lm_positions) > 0)
        assert not np.isin(ids[out.masked_lm_positions], CONFIG.special_ids).any()
        assert np.array_equal(out.masked_lm_ids, ids[out.masked_lm_positions])
        untouched = np.setdiff1d(np.arange(n), out.masked_lm_positions)
        assert np.array_equal(out.input_ids[untouched], ids[untouched])
        assert out.input_ids.dtype == ids.dtype


def test_cap_at_max_predictions_and_nothing_to_mask():
    rng = np.random.default_rng(1)
    ids = sample(rng, 512, 200)
    assert len(mask_tokens(ids, rng, CONFIG).masked_lm_positions) == 20
    only_special = np.array([CLS, SEP, PAD, PAD], dtype=np.uint16)
    out = mask_tokens(only_special, rng, CONFIG)
    assert len(out.masked_lm_positions) == 0 and np.array_equal(out.input_ids, only_special)


def test_80_10_10_and_random_tokens_never_special():
    rng = np.random.default_rng(2)
    as_mask = kept = random = 0
    for _ in range(3000):
        ids = sample(rng)
        out = mask_tokens(ids, rng, CONFIG)
        shown = out.input_ids[out.masked_lm_positions]
        as_mask += int(np.sum(shown == MASK))
        same = shown == out.masked_lm_ids
        kept += int(np.sum(same))
        replaced = shown[(shown != MASK) & ~same]
        random += len(replaced)
        assert not np.isin(replaced, CONFIG.special_ids).any()
    total = as_mask + kept + random
    # Binomial standard errors on ~57,000 positions are ~0.2%: 1% is a 5-sigma band.
    # (A random replacement can draw the original token: 1 in 995, so "kept" gains ~0.01%.)
    assert abs(as_mask / total - 0.8) < 0.01
    assert abs(random / total - 0.1) < 0.01
    assert abs(kept / total - 0.1) < 0.01


def test_whole_words_are_masked_together():
    rng = np.random.default_rng(3)
    for _ in range(300):
        ids = sample(rng)
        starts = rng.random(128) < 0.5
        out = mask_tokens(ids, rng, CONFIG, word_starts=starts)
        chosen = np.zeros(128, bool)
        chosen[out.masked_lm_positions] = True
        word = np.cumsum(starts | np.isin(np.arange(128), [0, 1, 60, 61, 127]))
        for w in np.unique(word[chosen]):
            members = (word == w) & ~np.isin(ids, CONFIG.special_ids)
            assert chosen[members].all(), "a word was masked only in part"
        assert len(out.masked_lm_positions) <= budgets([125], CONFIG)[0]


def test_whole_word_budget_is_filled_when_words_fit():
    ids = np.array([CLS] + list(range(10, 30)) + [SEP], dtype=np.uint16)
    starts = np.array([1] + [1, 0] * 10 + [1], dtype=bool)  # ten two-token words
    config = MaskingConfig(vocab_size=1000, mask_id=MASK, special_ids=CONFIG.special_ids,
                           masked_lm_prob=0.2, max_predictions=20)
    out = mask_tokens(ids, np.random.default_rng(4), config, starts)
    assert len(out.masked_lm_positions) == 4  # round(0.2 * 20) = 4 = two whole words
    assert np.all(out.masked_lm_positions[::2] % 2 == 1) and np.all(np.diff(out.masked_lm_positions)[::2] == 1)


def test_seeding_by_seed_epoch_index():
    ids = sample(np.random.default_rng(5))
    a = mask_sample(ids, CONFIG, seed=1, epoch=3, sample_index=17)
    b = mask_sample(ids, CONFIG, seed=1, epoch=3, sample_index=17)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_epoch = mask_sample(ids, CONFIG, seed=1, epoch=4, sample_index=17)
    other_index = mask_sample(ids, CONFIG, seed=1, epoch=3, sample_index=18)
    assert not np.array_equal(a.masked_lm_positions, other_epoch.masked_lm_positions)
    assert not np.array_equal(a.masked_lm_positions, other_index.masked_lm_positions)
    c = mask_tokens(ids, masking_rng(1, 3, 17), CONFIG)
    assert np.array_equal(a.input_ids, c.input_ids)


def test_padding_is_never_masked():
    ids = np.concatenate([sample(np.random.default_rng(6), 40, 20), np.full(88, PAD, np.uint16)])
    out = mask_sample(ids, CONFIG, seed=0, epoch=0, sample_index=0)
    assert out.masked_lm_positions.max() < 40 and len(out.masked_lm_positions) == 6


def test_continuation_table_marks_wordpiece_continuations():
    table = continuation_table({"[PAD]": 0, "play": 1, "##ing": 2, "##s": 3})
    assert table.tolist() == [False, False, True, True]


def test_config_is_validated():
    with pytest.raises(ValueError):
        MaskingConfig(vocab_size=10, mask_id=4, special_ids=(0, 1, 2, 3, 4), masked_lm_prob=1.5)
    with pytest.raises(ValueError):
        MaskingConfig(vocab_size=10, mask_id=4, special_ids=(0, 1, 2, 3, 4), mask_token_prob=0.95,
                      random_token_prob=0.1)


def test_bpe_whole_words_from_the_word_start_mark(bpe_tokenizer_dir):
    """Byte-level BPE: a word is a Ġ token (or a sentence's first) and the tokens after it without Ġ;
    whole-word masking masks all of a word's pieces; a CJK character cut into byte tokens stays whole."""
    from data_prep.encode import encode_documents
    from data_prep.vocab import load_tokenizer_dir
    from tests.data_prep.conftest import ZH_DOCS, english_docs

    tok, info = load_tokenizer_dir(bpe_tokenizer_dir)
    table = continuation_table(tok.get_vocab(), "BPE")
    assert not table[tok.token_to_id("\u0120the")] and table[tok.token_to_id("the")]
    docs = english_docs(20_000)[:40] + ZH_DOCS
    unit = encode_documents(docs, tok, max_segment_tokens=500, is_continuation=table)
    pieces = [tok.id_to_token(int(t)) for t in unit.tokens]
    firsts = set(unit.seg_start)
    for i, piece in enumerate(pieces):
        if i in firsts or piece.startswith("\u0120"):
            assert unit.word_starts[i], piece
    english = unit.seg_start[unit.doc_first[40]]
    assert sum(unit.word_starts[:english]) == sum(p.startswith("\u0120") for p in pieces[:english]) + \
        len([s for s in unit.seg_start if s < english])  # nothing else starts an English word
    # Chinese: jieba's words.  A byte token can hold the end of one character and the start of the next
    # (BPE merges bytes, not characters): it goes with its first character's word, so a few words decode
    # with a cut character; the rest are jieba's words (punctuation without Ġ joins the word before it).
    import jieba

    jieba_words = {w for d in ZH_DOCS for w in jieba.lcut(d)}
    zh_words = np.cumsum(unit.word_starts[english:])
    texts = [tok.decode(unit.tokens[english:][zh_words == w].tolist()) for w in np.unique(zh_words)]
    found = [t.rstrip("。！？，：“”") in jieba_words for t in texts]
    assert sum(found) > 0.8 * len(texts) and sum(len(t) > 1 for t, f in zip(texts, found) if f) > 40

    special = info.special_ids
    config = MaskingConfig(vocab_size=info.vocab_size, mask_id=info.mask_id, special_ids=special, max_predictions=40)
    rng = np.random.default_rng(8)
    for s in range(len(unit.seg_start)):
        lo, hi = unit.seg_start[s], unit.seg_end[s]
        ids = np.concatenate([[info.cls_id], unit.tokens[lo:hi], [info.sep_id]])
        starts = np.concatenate([[1], unit.word_starts[lo:hi], [1]]).astype(bool)
        out = mask_tokens(ids, rng, config, word_starts=starts)
        chosen = np.zeros(len(ids), bool)
        chosen[out.masked_lm_positions] = True
        word = np.cumsum(starts)
        for w in np.unique(word[chosen]):
            assert chosen[(word == w) & ~np.isin(ids, special)].all(), "a word was masked only in part"
