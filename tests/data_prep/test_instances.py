"""Instances: NSP, SOP, full-sentences and blocks on synthetic units (token ids encode their position)."""
from __future__ import annotations

import bisect

import numpy as np
import pytest

from data_prep.encode import EncodedUnit, _layout
from data_prep.instances import Instance, create_instances, fill_row, instance_rng, token_type_ids, truncate_pair

CLS, SEP = 2, 3


def row_of(inst: Instance, tokens: np.ndarray, word_starts: np.ndarray | None = None):
    """(input_ids, token_type_ids, word_starts or None) of one instance, as the builder lays a row out."""
    ids = np.full(256, -1, dtype=np.int32)
    starts = np.zeros(256, dtype=np.uint8) if word_starts is not None else None
    n = fill_row(inst, tokens, CLS, SEP, ids, word_starts, starts)
    return ids[:n], token_type_ids(ids[:n], SEP, inst.b is not None), None if starts is None else starts[:n]


def make_unit(docs: list[list[int]], max_segment_tokens: int = 1000) -> EncodedUnit:
    """docs: sentence lengths per document; token k of the unit has id 100 + k."""
    lengths = np.array([n for doc in docs for n in doc], dtype=np.int64)
    tokens = np.arange(100, 100 + int(lengths.sum()), dtype=np.int32)
    return _layout(tokens, None, lengths, [len(d) for d in docs], max_segment_tokens, len(lengths))


def doc_of(unit: EncodedUnit, token: int) -> int:
    if getattr(unit, "_doc_starts", None) is None:
        unit._doc_starts = [unit.seg_start[f] for f in unit.doc_first]
    d = bisect.bisect_right(unit._doc_starts, token) - 1
    assert unit.seg_start[unit.doc_first[d]] <= token < unit.seg_end[unit.doc_end[d] - 1]
    return d


def test_layout_splits_long_sentences_and_drops_empty_ones():
    unit = make_unit([[5, 0, 25], [0], [3]], max_segment_tokens=10)
    assert list(zip(unit.seg_start, unit.seg_end)) == [(0, 5), (5, 15), (15, 25), (25, 30), (30, 33)]
    assert unit.num_docs == 2 and (unit.doc_first, unit.doc_end) == ([0, 4], [4, 5])


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_pairs_fit_and_labels_are_balanced_on_short_documents(objective):
    rng = np.random.default_rng(0)
    # Paragraph-like documents, many of a single sentence: BERT's script would label these mostly 1.
    docs = [[int(n) for n in rng.integers(3, 40, size=rng.integers(1, 4))] for _ in range(3000)]
    unit = make_unit(docs)
    seq_len = 64
    insts = create_instances(unit, objective, seq_len, 0.1, instance_rng(1))
    labels = np.array([i.label for i in insts])
    # 4 binomial standard deviations
    assert abs(labels.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(labels))
    for inst in insts:
        (a,), b = inst.a, inst.b
        assert a[1] > a[0] and b[1] > b[0] and (a[1] - a[0]) + (b[1] - b[0]) <= seq_len - 3
        same_doc = doc_of(unit, a[0]) == doc_of(unit, b[0])
        if objective == "nsp" and inst.label == 1:
            assert not same_doc or unit.num_docs == 1
        elif objective == "nsp":
            assert same_doc and b[0] >= a[1]  # B continues A (truncation may drop tokens between)
        else:
            assert same_doc and ((b[0] >= a[1]) == (inst.label == 0))


def test_nsp_random_next_puts_unused_sentences_back():
    unit = make_unit([[10] * 8, [10] * 8])
    insts = create_instances(unit, "nsp", 128, 0.0, instance_rng(3))
    covered = set()
    for inst in insts:
        covered.update(range(*inst.a[0]))
        if inst.label == 0:
            covered.update(range(*inst.b))
    assert covered == set(range(160))  # every sentence lands in some A (or actual B)


def test_truncate_pair_lengths_and_ends():
    rng = instance_rng(4)
    a, b = truncate_pair((0, 100), (100, 130), 60, rng)
    assert (a[1] - a[0], b[1] - b[0]) == (30, 30)
    a, b = truncate_pair((0, 40), (40, 80), 61, rng)
    assert (a[1] - a[0], b[1] - b[0]) == (31, 30)  # equal lengths: B is trimmed first
    fronts = []
    for _ in range(2000):
        a, _b = truncate_pair((0, 100), (100, 110), 50, rng)
        assert a[1] - a[0] == 40
        fronts.append(a[0])
    assert abs(np.mean(fronts) - 30) < 1.0  # 60 removals, half from the front on average
    assert truncate_pair((0, 5), (5, 9), 20, rng) == ((0, 5), (5, 9))


def test_full_sentences_pack_across_documents():
    docs = [[7, 9, 30], [12], [5, 50, 8], [20, 20]]
    unit = make_unit(docs)
    seq_len = 64
    insts = create_instances(unit, "full-sentences", seq_len, 0.1, instance_rng(5))
    seen = []
    for inst in insts:
        ids, types, _ = row_of(inst, unit.tokens)
        assert len(ids) <= seq_len and ids[0] == CLS and ids[-1] == SEP and not types.any()
        assert inst.label == -1 and inst.b is None
        for s, e in inst.a:
            seen.extend(range(s, e))
            assert doc_of(unit, s) == doc_of(unit, e - 1)  # [SEP] marks every document change
    assert seen == list(range(len(unit.tokens)))  # every token once, in order
    first, _, _ = row_of(insts[0], unit.tokens)
    assert first.tolist() == [CLS] + list(range(100, 146)) + [SEP] + list(range(146, 158)) + [SEP]


@pytest.mark.parametrize("docs", [[[7, 9, 30], [12], [5, 50, 8], [20, 20]] * 6, [[300], [1], [2, 3]] * 4,
                                  [[3], [1], [2]] * 40])
def test_blocks_fill_rows_and_keep_the_stream(docs):
    """Every row but a pass's last has exactly seq_len tokens; rows without [CLS] and their final [SEP]
    are the unit's stream (each document then [SEP]) from the pass's seeded offset, wrapping round."""
    unit = make_unit(docs)
    seq_len, width = 32, 30
    stream = []
    for d in range(unit.num_docs):
        stream += list(range(100 + unit.seg_start[unit.doc_first[d]], 100 + unit.seg_end[unit.doc_end[d] - 1])) + [SEP]
    passes = set()
    for dupe in range(4):
        insts = create_instances(unit, "blocks", seq_len, 0.1, instance_rng(5, dupe))
        assert insts == create_instances(unit, "blocks", seq_len, 0.1, instance_rng(5, dupe))
        offset = instance_rng(5, dupe).randrange(width)
        rows = [row_of(inst, unit.tokens) for inst in insts]
        got = []
        for i, (ids, types, _) in enumerate(rows):
            assert ids[0] == CLS and ids[-1] == SEP and not types.any() and insts[i].label == -1
            assert len(ids) == seq_len or (i == len(rows) - 1 and 2 * (len(ids) - 2) >= width)
            got += ids[1:-1].tolist()
        rotated = stream[offset:] + stream[:offset]
        assert len(rotated) - len(got) < width / 2 and got == rotated[:len(got)]
        passes.add(tuple(insts))
    assert len(passes) > 1  # passes cut different rows


def test_blocks_tiny_unit_keeps_a_half_row_or_nothing():
    assert create_instances(make_unit([[3]]), "blocks", 32, 0.1, instance_rng(1)) == []
    (inst,) = create_instances(make_unit([[20]]), "blocks", 32, 0.1, instance_rng(1))
    assert sum(e - s for s, e in inst.a) == 20


def test_fill_row_pair_layout_and_word_starts():
    unit = make_unit([[3, 2]])
    starts = np.array([1, 0, 1, 1, 0], dtype=bool)
    ids, types, ws = row_of(Instance(((0, 3),), (3, 5), 0), unit.tokens, starts)
    assert ids.tolist() == [CLS, 100, 101, 102, SEP, 103, 104, SEP]
    assert types.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert ws.tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    assert types.dtype == np.uint8


def test_same_rng_same_instances():
    unit = make_unit([[int(n) for n in np.random.default_rng(6).integers(1, 30, 5)] for _ in range(50)])
    a = create_instances(unit, "nsp", 128, 0.1, instance_rng(7))
    b = create_instances(unit, "nsp", 128, 0.1, instance_rng(7))
    assert a == b


# RoBERTa's framing (a BPE tokenizer): <s> A </s></s> B </s>; ids as RoBERTa's, <s> 0 and </s> 2
BOS, EOS = 0, 2


def roberta_row(inst: Instance, tokens: np.ndarray, word_starts: np.ndarray | None = None):
    ids = np.full(256, -1, dtype=np.int32)
    starts = np.zeros(256, dtype=np.uint8) if word_starts is not None else None
    n = fill_row(inst, tokens, BOS, EOS, ids, word_starts, starts, double_sep=True)
    return ids[:n], None if starts is None else starts[:n]


def test_roberta_pair_framing_and_word_starts():
    unit = make_unit([[3, 2]])
    starts = np.array([1, 0, 1, 0, 1], dtype=bool)
    ids, ws = roberta_row(Instance(((0, 3),), (3, 5), 0), unit.tokens, starts)
    assert ids.tolist() == [BOS, 100, 101, 102, EOS, EOS, 103, 104, EOS]
    assert ws.tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1]
    single, _ = roberta_row(Instance(((0, 5),), None, -1), unit.tokens)
    assert single.tolist() == [BOS, 100, 101, 102, 103, 104, EOS]


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_roberta_pairs_leave_room_for_the_second_separator(objective):
    rng = np.random.default_rng(2)
    unit = make_unit([[int(n) for n in rng.integers(3, 60, size=rng.integers(1, 5))] for _ in range(400)])
    seq_len = 64
    insts = create_instances(unit, objective, seq_len, 0.0, instance_rng(3), double_sep=True)
    lengths = [len(roberta_row(inst, unit.tokens)[0]) for inst in insts]
    assert max(lengths) == seq_len  # long documents fill the row exactly, the two </s> counted
    for inst in insts:
        ids, _ = roberta_row(inst, unit.tokens)
        (a,) = inst.a
        assert ids[a[1] - a[0] + 1: a[1] - a[0] + 3].tolist() == [EOS, EOS] and ids[-1] == EOS


def test_roberta_full_sentences_double_separator_between_documents():
    docs = [[7, 9, 30], [12], [5, 50, 8], [20, 20]]
    unit = make_unit(docs)
    seq_len = 64
    insts = create_instances(unit, "full-sentences", seq_len, 0.1, instance_rng(5), double_sep=True)
    seen = []
    for inst in insts:
        ids, _ = roberta_row(inst, unit.tokens)
        assert len(ids) <= seq_len and ids[0] == BOS and ids[-1] == EOS
        seen.extend(t for s, e in inst.a for t in range(s, e))
    assert seen == list(range(len(unit.tokens)))
    first, _ = roberta_row(insts[0], unit.tokens)
    # 1 + 46 + 1 + 1 + 12 + 1 = 62: the third document (63 tokens) starts the next row
    assert first.tolist() == [BOS] + list(range(100, 146)) + [EOS, EOS] + list(range(146, 158)) + [EOS]
    # two documents that fill 64 exactly with one [SEP] between them need two rows with two
    tight = make_unit([[30], [31]])
    (one,) = create_instances(tight, "full-sentences", 64, 0.1, instance_rng(5))
    assert len(row_of(one, tight.tokens)[0]) == 64
    a, b = create_instances(tight, "full-sentences", 64, 0.1, instance_rng(5), double_sep=True)
    assert [len(roberta_row(i, tight.tokens)[0]) for i in (a, b)] == [32, 33]
