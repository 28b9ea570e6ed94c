"""Documents of a work unit -> sentence-split token ids in one flat array (CSR layout).

Sentences are tokenized with the tokenizers batch API (Rust, one thread per worker process); the
result is one int32 array of every token of the unit plus the [start, end) of each segment and the
range of segments of each document, so that building instances only moves integers around.

Segments are sentences; a sentence longer than ``max_segment_tokens`` is cut into pieces of that
size, and sentences with no tokens are dropped.  Whole-word flags (``word_starts``) are computed
here when asked: from WordPiece ``##`` continuations or byte-level BPE's ``Ġ`` word-start mark (a
sentence's first token always starts a word), and for CJK text from jieba word boundaries (jieba
runs only on sentences that contain CJK characters).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain

import numpy as np

from data_prep.sentences import split_sentences
from data_prep.vocab import CJK_CHAR, is_cjk_char

ENCODE_BATCH = 2048  # sentences per encode_batch call


@dataclass
class EncodedUnit:
    tokens: np.ndarray  # int32 [T]: every token of the unit, sentence after sentence
    word_starts: np.ndarray | None  # bool [T] when whole-word flags were asked for
    seg_start: list[int]  # segment i is tokens[seg_start[i]:seg_end[i]]
    seg_end: list[int]
    doc_first: list[int]  # document d is segments doc_first[d] .. doc_end[d]-1 (never empty)
    doc_end: list[int]
    num_sentences: int

    @property
    def num_docs(self) -> int:
        return len(self.doc_first)


_jieba = None


def _jieba_tokenizer():
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba.Tokenizer()
        _jieba.initialize()
    return _jieba


def jieba_word_starts(sentence: str, offsets: list[tuple[int, int]], starts: np.ndarray) -> None:
    """Set ``starts[i]`` for CJK tokens, in place: true where a jieba word begins.  A character that
    byte-level BPE splits into several tokens (each with the character's offsets) starts at its first."""
    word_begins = set()
    pos = 0
    for word in _jieba_tokenizer().cut(sentence):
        word_begins.add(pos)
        pos += len(word)
    previous = None
    for i, (begin, end) in enumerate(offsets):
        if end > begin and is_cjk_char(sentence[begin]):
            starts[i] = begin in word_begins and begin != previous
        previous = begin


def encode_documents(texts: list[str], tokenizer, *, max_segment_tokens: int,
                     is_continuation: np.ndarray | None = None, drop_ids: tuple[int, ...] = ()) -> EncodedUnit:
    """Split, tokenize and lay out ``texts``.  ``is_continuation`` (bool over the vocabulary)
    switches on whole-word flags.  ``drop_ids``: ids removed from the text (the tokenizer turns a
    literal "[SEP]" in a document into the special token, which must not reach a sample)."""
    sentences: list[str] = []
    doc_sizes: list[int] = []
    for text in texts:
        parts = split_sentences(text)
        sentences.extend(parts)
        doc_sizes.append(len(parts))
    ids_per_sentence: list[list[int]] = []
    cjk: list[tuple[int, str, list]] = []  # (sentence index, sentence, token offsets) for jieba
    for lo in range(0, len(sentences), ENCODE_BATCH):
        batch = sentences[lo: lo + ENCODE_BATCH]
        has_cjk = [] if is_continuation is None else [i for i, s in enumerate(batch) if CJK_CHAR.search(s)]
        # encode_batch_fast skips the character offsets; jieba alignment needs them.
        encode = tokenizer.encode_batch if has_cjk else getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = encode(batch, add_special_tokens=False)
        ids_per_sentence.extend(enc.ids for enc in encodings)
        cjk.extend((lo + i, batch[i], encodings[i].offsets) for i in has_cjk)
    lengths = np.fromiter((len(x) for x in ids_per_sentence), dtype=np.int64, count=len(ids_per_sentence))
    tokens = np.fromiter(chain.from_iterable(ids_per_sentence), dtype=np.int32, count=int(lengths.sum()))
    word_starts = None
    if is_continuation is not None:
        word_starts = ~is_continuation[tokens]
        sentence_at = np.concatenate(([0], np.cumsum(lengths)))
        word_starts[sentence_at[:-1][lengths > 0]] = True  # BPE's first token has no Ġ (no space before it)
        for index, sentence, offsets in cjk:
            begin = int(sentence_at[index])
            jieba_word_starts(sentence, offsets, word_starts[begin: begin + len(offsets)])
    if drop_ids:
        keep = ~np.isin(tokens, drop_ids)
        if not keep.all():
            sentence_of = np.repeat(np.arange(len(lengths)), lengths)
            lengths = np.bincount(sentence_of[keep], minlength=len(lengths))
            tokens = tokens[keep]
            word_starts = word_starts[keep] if word_starts is not None else None
    return _layout(tokens, word_starts, lengths, doc_sizes, max_segment_tokens, len(sentences))


def _layout(tokens, word_starts, lengths: np.ndarray, doc_sizes: list[int], max_segment_tokens: int,
            num_sentences: int) -> EncodedUnit:
    ends = np.cumsum(lengths).tolist()
    starts = [e - n for e, n in zip(ends, lengths.tolist())]
    seg_start, seg_end, doc_first, doc_end = [], [], [], []
    s = 0
    for size in doc_sizes:
        first = len(seg_start)
        for begin, end in zip(starts[s: s + size], ends[s: s + size]):
            while end - begin > max_segment_tokens:  # an over-long sentence becomes several segments
                seg_start.append(begin)
                seg_end.append(begin + max_segment_tokens)
                begin += max_segment_tokens
            if end > begin:
                seg_start.append(begin)
                seg_end.append(end)
        s += size
        if len(seg_start) > first:
            doc_first.append(first)
            doc_end.append(len(seg_start))
    return EncodedUnit(tokens, word_starts, seg_start, seg_end, doc_first, doc_end, num_sentences)
