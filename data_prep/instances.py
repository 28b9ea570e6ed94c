"""Stage 5, instances: segment pairs (NSP, SOP) or packed sentences (RoBERTa) from an encoded unit.

Instances are token *ranges* into ``EncodedUnit.tokens`` (segments of a document are contiguous
there, and truncation only trims ends), so building them moves integers, not tokens.

* ``nsp``: BERT's create_instances_from_document: a target length (``short_seq_prob`` of the time
  a random one in [2, max]), chunks of whole sentences, A = a random prefix of the chunk, B = the
  rest (label 0) or, half of the time, text from a random other document of the same unit
  (label 1, the unused sentences are put back); then the pair is truncated to fit, each removal
  from the front or back at random.  One change: BERT's script must use a random B whenever the
  chunk is a single sentence, which skews the labels towards 1 on corpora of short documents
  (one paragraph per line); we split such a sentence at a random token instead, so the label
  is a fair coin whatever the document lengths.
* ``sop``: ALBERT: the same chunks, A and B always consecutive, swapped half of the time (label 1).
* ``full-sentences``: RoBERTa: whole sentences packed in order up to the sequence length, across
  document boundaries ([SEP] between documents), no sentence label.
* ``blocks``: complete rows (HF run_mlm's group_texts, Megatron): the unit's documents are one
  stream of tokens with a [SEP] after each document, cut into rows of exactly ``seq_len``
  ([CLS], ``seq_len - 2`` stream tokens, [SEP]); a sentence that does not fit is cut at the row
  end and goes on in the next row.  Each duplicate pass rotates the stream by its own seeded
  offset in [0, seq_len - 2) (the tokens before it close the pass, after the last document's
  [SEP]), so passes cut different rows and no token is lost.  The pass's last row, partial, is
  kept if it holds at least half of the ``seq_len - 2`` stream tokens, else dropped (HF drops
  it always).  No sentence label; the row's first token counts as a word start (builder).

Framing: BERT's ``[CLS] A [SEP] B [SEP]``; with ``double_sep`` (a RoBERTa BPE tokenizer, where [CLS]
is ``<s>`` and [SEP] ``</s>``) RoBERTa's ``<s> A </s></s> B </s>``: two separators between segments
(the pair of nsp/sop, the documents of full-sentences), so those budgets count one token more per
boundary.  ``blocks`` rows keep one ``</s>`` after each document: it ends a document of the stream,
as fairseq's end-of-sentence token does, and the rows stay exactly ``seq_len`` long.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np

from data_prep.config import OBJECTIVES
from data_prep.encode import EncodedUnit

RANDOM_DOC_TRIES = 10
NO_LABEL = -1


class Instance(NamedTuple):
    a: tuple[tuple[int, int], ...]  # token ranges of segment A ([SEP] after each range)
    b: tuple[int, int] | None  # token range of segment B (pairs) or None
    label: int  # nsp: 1 = B is random; sop: 1 = swapped; full-sentences, blocks: -1


def instance_rng(*key: int) -> random.Random:
    """A random.Random seeded from a tuple of non-negative ints through numpy's SeedSequence."""
    state = np.random.SeedSequence(list(key)).generate_state(4, dtype=np.uint32)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


def truncate_pair(a: tuple[int, int], b: tuple[int, int], max_tokens: int, rng) -> tuple:
    """Trim the longer of A, B one token at a time until they fit, each time at a random end.

    Same distribution as BERT's truncate_seq_pair, drawn in closed form: how many tokens each
    side loses is fixed by the lengths, and how many of those come off the front is binomial.
    """
    la, lb = a[1] - a[0], b[1] - b[0]
    excess = la + lb - max_tokens
    if excess <= 0:
        return a, b
    gap = abs(la - lb)
    first = min(excess, gap)  # from the longer side until both are equal
    rest = excess - first
    cut_a = (first if la > lb else 0) + rest // 2
    cut_b = (first if la <= lb else 0) + rest - rest // 2  # ties trim B first, as the script does
    front_a, front_b = _coin_heads(rng, cut_a), _coin_heads(rng, cut_b)
    return (a[0] + front_a, a[1] - (cut_a - front_a)), (b[0] + front_b, b[1] - (cut_b - front_b))


def _coin_heads(rng, n: int) -> int:
    """Binomial(n, 1/2): the number of ones among n random bits."""
    return bin(rng.getrandbits(n)).count("1") if n > 0 else 0


def _split_segment(start: int, end: int, rng) -> tuple[tuple[int, int], tuple[int, int]] | None:
    if end - start < 2:
        return None
    cut = rng.randrange(start + 1, end)
    return (start, cut), (cut, end)


def _random_b(unit: EncodedUnit, doc: int, target: int, rng) -> tuple[int, int]:
    """A range of at least ``target`` tokens (or to the document's end) from another document."""
    other = doc
    for _ in range(RANDOM_DOC_TRIES):
        other = rng.randrange(unit.num_docs)
        if other != doc:
            break
    first = rng.randrange(unit.doc_first[other], unit.doc_end[other])
    end = first
    while end < unit.doc_end[other]:
        end += 1
        if unit.seg_end[end - 1] - unit.seg_start[first] >= target:
            break
    return unit.seg_start[first], unit.seg_end[end - 1]


def pair_instances(unit: EncodedUnit, doc: int, rng, max_tokens: int, short_seq_prob: float,
                   objective: str) -> list[Instance]:
    """NSP or SOP instances of one document (``max_tokens`` = seq_len - 3, or - 4 with two separators)."""
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = rng.randrange(2, max_tokens + 1)
    s_start, s_end = unit.seg_start, unit.seg_end
    out: list[Instance] = []
    chunk_first, i, end = unit.doc_first[doc], unit.doc_first[doc], unit.doc_end[doc]
    while i < end:
        if i == end - 1 or s_end[i] - s_start[chunk_first] >= target:
            n = i + 1 - chunk_first
            a_segs = rng.randrange(1, n) if n >= 2 else 1
            a = (s_start[chunk_first], s_end[chunk_first + a_segs - 1])
            if objective == "nsp" and rng.random() < 0.5:
                b, label = _random_b(unit, doc, target - (a[1] - a[0]), rng), 1
                i = chunk_first + a_segs - 1  # put the unused sentences back
            elif n >= 2:
                b, label = (s_start[chunk_first + a_segs], s_end[i]), 0
            else:
                halves = _split_segment(a[0], a[1], rng)
                if halves is None:
                    if objective == "nsp":  # a one-token document: only a random B is possible
                        b, label = _random_b(unit, doc, target - 1, rng), 1
                    else:
                        chunk_first = i = i + 1
                        continue
                else:
                    (a, b), label = halves, 0
            if objective == "sop":
                label = int(rng.random() < 0.5)
                if label:
                    a, b = b, a
            a, b = truncate_pair(a, b, max_tokens, rng)
            out.append(Instance((a,), b, label))
            chunk_first = i + 1
        i += 1
    return out


def packed_instances(unit: EncodedUnit, seq_len: int, double_sep: bool = False) -> list[Instance]:
    """RoBERTa FULL-SENTENCES: [CLS] sentences... [SEP] (next document) ... [SEP], up to seq_len
    (``double_sep``: [SEP] [SEP] between documents)."""
    out: list[Instance] = []
    ranges: list[tuple[int, int]] = []
    used = 1  # [CLS]
    for doc in range(unit.num_docs):
        for seg in range(unit.doc_first[doc], unit.doc_end[doc]):
            start, end = unit.seg_start[seg], unit.seg_end[seg]
            new_range = not ranges or seg == unit.doc_first[doc]
            # a new range brings its [SEP], and after another range the second [SEP] before it
            cost = (end - start) + (1 + (double_sep and bool(ranges)) if new_range else 0)
            if used + cost > seq_len and ranges:
                out.append(Instance(tuple(ranges), None, NO_LABEL))
                ranges, used, new_range = [], 1, True
                cost = (end - start) + 1
            if new_range:
                ranges.append((start, end))
            else:
                ranges[-1] = (ranges[-1][0], end)
            used += cost
    if ranges:
        out.append(Instance(tuple(ranges), None, NO_LABEL))
    return out


def block_instances(unit: EncodedUnit, seq_len: int, rng) -> list[Instance]:
    """BLOCKS: rows of exactly seq_len cut from the unit's stream (documents, a [SEP] after each),
    rotated by a seeded offset; a range of a row is followed by a [SEP], the last one by the row's
    own [SEP] (an empty range: the row starts or ends on a document's [SEP])."""
    if unit.num_docs == 0:
        return []
    width = seq_len - 2
    docs = [(unit.seg_start[unit.doc_first[d]], unit.seg_end[unit.doc_end[d] - 1]) for d in range(unit.num_docs)]
    offset = rng.randrange(width)
    k = 0  # the document (with its [SEP]) the offset falls in
    while k < len(docs) - 1 and offset > docs[k][1] - docs[k][0]:
        offset -= docs[k][1] - docs[k][0] + 1
        k += 1
    start, end = docs[k]
    split = min(start + offset, end)  # a unit shorter than the offset: no rotation beyond its end
    pieces = [(split, end, True), *[(s, e, True) for s, e in docs[k + 1:] + docs[:k]], (start, split, False)]
    out: list[Instance] = []
    ranges: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None  # the open range, not yet followed by a [SEP]
    room = width

    def emit(at: int) -> None:
        nonlocal ranges, cur, room
        out.append(Instance(tuple(ranges) + (cur if cur is not None else (at, at),), None, NO_LABEL))
        ranges, cur, room = [], None, width

    for s, e, sep in pieces:
        while s < e:
            if room == 0:
                emit(s)
            take = min(e - s, room)
            cur = (s if cur is None else cur[0], s + take)
            s += take
            room -= take
        if sep:
            if room == 0:
                emit(e)
            ranges.append(cur if cur is not None else (e, e))
            cur, room = None, room - 1
    if 2 * (width - room) >= width:  # full, or a partial last row of at least half the width
        emit(start)
    return out


def create_instances(unit: EncodedUnit, objective: str, seq_len: int, short_seq_prob: float,
                     rng: random.Random, double_sep: bool = False) -> list[Instance]:
    """All instances of one pass (one duplicate) over the unit, in document order; ``double_sep``:
    RoBERTa's framing (module doc), which fill_row must then be given too.

    ``rng`` is a ``random.Random``: its scalar draws are ~10x cheaper than numpy's, and its
    stream is stable across Python versions (see ``instance_rng``).
    """
    if objective == "full-sentences":
        return packed_instances(unit, seq_len, double_sep)
    if objective == "blocks":
        return block_instances(unit, seq_len, rng)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    out: list[Instance] = []
    for doc in range(unit.num_docs):
        out.extend(pair_instances(unit, doc, rng, seq_len - 3 - double_sep, short_seq_prob, objective))
    return out


def fill_row(inst: Instance, tokens: np.ndarray, cls_id: int, sep_id: int, row: np.ndarray,
             word_starts: np.ndarray | None = None, starts_row: np.ndarray | None = None,
             double_sep: bool = False) -> int:
    """Write ``[CLS] A [SEP] B [SEP]`` (or ``[CLS] r1 [SEP] r2 [SEP] ...``) into ``row``; returns its length.
    ``double_sep``: RoBERTa's ``<s> A </s></s> B </s>`` (a second separator before each later range).

    ``starts_row`` gets the whole-word flags (1 on special tokens) when ``word_starts`` is given.
    """
    pieces = inst.a + ((inst.b,) if inst.b is not None else ())
    row[0] = cls_id
    if starts_row is not None:
        starts_row[0] = 1
    pos = 1
    for k, (s, e) in enumerate(pieces):
        if double_sep and k:
            row[pos] = sep_id
            if starts_row is not None:
                starts_row[pos] = 1
            pos += 1
        row[pos: pos + e - s] = tokens[s:e]
        if starts_row is not None:
            starts_row[pos: pos + e - s] = word_starts[s:e]
            starts_row[pos + e - s] = 1
        pos += e - s
        row[pos] = sep_id
        pos += 1
    return pos


def token_type_ids(input_ids: np.ndarray, sep_id: int, pair: bool) -> np.ndarray:
    """Segment ids of a stored sample: 0 up to and including the first [SEP], then 1 (pairs only)."""
    types = np.zeros(len(input_ids), dtype=np.uint8)
    if pair:
        first_sep = int(np.argmax(np.asarray(input_ids) == sep_id))
        types[first_sep + 1:] = 1
    return types

