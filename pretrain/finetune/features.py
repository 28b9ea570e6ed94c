"""Task examples (:mod:`pretrain.finetune.tasks`) -> model features, a padding collate, and QA span decoding.

The tokenizer is an HF ``tokenizers`` object as ``data_prep.vocab.load_tokenizer_dir`` /
``read_tokenizer`` return it (a data_prep tokenizer directory, or an HF model directory with a
tokenizer.json or a vocab.txt).  Texts are encoded without special tokens and this module lays
out ``[CLS]``/``[SEP]`` itself with the tokenizer's ids, so truncation and windows are exact
whatever post-processor the file declares; truncation or padding stored in a tokenizer.json is
ignored (a copy without it is used).  A RoBERTa byte-level BPE tokenizer gets RoBERTa's framing, as
transformers' RobertaTokenizer lays it out: ``<s>`` for [CLS], ``</s>`` for [SEP], ``</s></s>``
between the two texts of a pair (one token more to make room for), token types all 0, and each
pre-split word of token classification encoded after a space (``add_prefix_space=True``).

Features are unpadded lists, one dataclass per task; :func:`collate` pads a batch to its longest
feature (dynamic padding) and returns int64 tensors (float32 regression labels).

* **Classification** (:func:`encode_classification`): ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``,
  token types 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``; ``max_length`` counts the special
  tokens; an empty B counts as none (as in BERT's run_classifier and transformers).  Too long:
  longest-first truncation, HF tokenizers' rule (tokens leave the end of the longer text; when both
  must be cut each keeps half the room, the longer one the odd token; BERT's ``_truncate_seq_pair``
  differs only in giving the odd token to A).  ``label`` is a class id, a float (regression:
  ``label_to_id=None``) or None (unlabeled).
* **Token classification** (:func:`encode_tokens`): words come pre-split; each is encoded alone
  (HF's ``is_split_into_words``) and its label goes on its first sub-token, ``IGNORE_INDEX`` on the
  others, or on every sub-token with ``label_all_subtokens`` (continuation pieces of a ``B-X`` word
  get ``I-X`` where that tag exists, as HF's run_ner does).  A word that encodes to nothing (a lone
  control character) becomes ``[UNK]``, so every word has a position.  A sentence longer than
  ``max_length - 2`` sub-tokens is split into windows of whole words, a new one starting every
  ``stride`` tokens (default: half a window), so words near a cut still see context.  Each word
  belongs to exactly one window (an overlap is split at its middle word); only a window's own words
  carry labels, and :func:`word_predictions` reads every word's prediction at its first sub-token in
  its own window.  Nothing is truncated away from entity scoring.
* **Extractive QA** (:func:`encode_squad`): BERT's run_squad layout ``[CLS] question [SEP] context
  window [SEP]``: the question is cut to ``max_query_length`` tokens, the context is split into
  windows of at most ``max_length - len(question) - 3`` tokens starting every ``doc_stride`` tokens.
  ``start_position``/``end_position`` are the token indices of the first answer in the window, or 0
  (the ``[CLS]`` index) when the question is unanswerable or the answer is not wholly inside the
  window.  ``offsets`` holds each context token's character span in the context (None for the
  question and special tokens); ``token_is_max_context`` marks the tokens this window scores (a
  token in several windows counts where it has the most context, BERT's rule).
* **QA decoding** (:func:`decode_squad`): BERT's ``write_predictions``: the ``n_best`` start and end
  logits of each window, spans inside the context, at a max-context start, at most
  ``max_answer_length`` tokens, ranked by start + end logit across the windows of a question; the
  text is cut from the context at the tokens' offsets.  SQuAD v2 adds the null answer scored by the
  ``[CLS]`` logits (the lowest over the windows) and predicts "" when that score minus the best
  span's exceeds ``null_score_diff_threshold``; the differences are returned for threshold tuning.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from data_prep.masking import IGNORE_INDEX
from pretrain.finetune.tasks import ClassificationExample, QAExample, TaskDataError, TokenSentence


@dataclass
class ClassificationFeature:
    input_ids: list[int]
    token_type_ids: list[int]
    label: Union[int, float, None]  # class id, regression target, or None (unlabeled)
    example_index: int


@dataclass
class TokenFeature:
    input_ids: list[int]
    token_type_ids: list[int]
    labels: Optional[list[int]]  # per token: a tag id on the window's own words, else IGNORE_INDEX
    word_ids: list[Optional[int]]  # per token: index of its word in the sentence (None: [CLS]/[SEP])
    owned_words: tuple[int, int]  # [first, end) words this window labels and predicts
    num_words: int  # words in the whole sentence
    example_index: int


@dataclass
class SquadFeature:
    input_ids: list[int]
    token_type_ids: list[int]
    start_position: int  # 0 ([CLS]) when unanswerable or the answer is outside this window
    end_position: int
    offsets: list[Optional[tuple[int, int]]]  # per token: (start, end) characters in the context
    token_is_max_context: list[bool]
    example_index: int


@dataclass
class QAPredictions:
    answers: dict[str, str]  # question id -> predicted text ("" = no answer)
    null_score_diff: dict[str, float] = field(default_factory=dict)  # v2: null score - best span score
    n_best: dict[str, list[dict]] = field(default_factory=dict)  # id -> [{text, probability, start_logit, end_logit}]


@dataclass(frozen=True)
class _Specials:
    cls: int
    sep: int
    unk: int
    roberta: bool = False  # a RoBERTa BPE tokenizer: </s></s> between a pair's texts, token types all 0

    @property
    def between(self) -> list[int]:
        """The separators between the two texts of a pair."""
        return [self.sep, self.sep] if self.roberta else [self.sep]

    def pair_types(self, n_first: int, n_second: int) -> list[int]:
        """Token types of a pair laid out as [CLS] first [SEP](s) second [SEP] (both counts include their [SEP])."""
        return [0] * (n_first + n_second + 1) if self.roberta else [0] * (n_first + 1) + [1] * n_second


def _prepare(tokenizer):
    """(tokenizer without stored truncation/padding, special ids)."""
    from data_prep.errors import PrepError
    from data_prep.vocab import special_token_ids, tokenizer_model

    try:
        ids = special_token_ids(tokenizer)
    except PrepError as err:
        raise ValueError(f"{err} (a BERT WordPiece or RoBERTa BPE tokenizer)") from None
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return tokenizer, _Specials(ids["cls"], ids["sep"], ids["unk"], tokenizer_model(tokenizer) == "BPE")


def _encode(tokenizer, texts: list) -> list:
    return tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []


# ---------------------------------------------------------------------------------------------
# Sequence classification and regression
# ---------------------------------------------------------------------------------------------

def encode_classification(tokenizer, examples: Sequence[ClassificationExample], max_length: int,
                          label_to_id: Optional[dict[str, int]]) -> list[ClassificationFeature]:
    """One feature per example (see the module doc); ``label_to_id=None`` for regression."""
    tokenizer, special = _prepare(tokenizer)
    framing = 2 + len(special.between)  # [CLS] A [SEP] ([SEP]) B [SEP]
    if max_length < framing:
        raise ValueError(f"max_length must be >= {framing} ([CLS] A [SEP] B [SEP] needs room), got {max_length}")
    firsts = _encode(tokenizer, [ex.text for ex in examples])
    pairs = [i for i, ex in enumerate(examples) if ex.text_pair]  # "" is no pair, as in BERT and transformers
    seconds = dict(zip(pairs, _encode(tokenizer, [examples[i].text_pair for i in pairs])))
    features = []
    for i, (ex, first) in enumerate(zip(examples, firsts)):
        a = first.ids
        if i in seconds:
            b = seconds[i].ids
            n_a, n_b = truncate_longest_first(len(a), len(b), max_length - 2 - len(special.between))
            ids = [special.cls, *a[:n_a], *special.between, *b[:n_b], special.sep]
            types = special.pair_types(n_a + len(special.between), n_b + 1)
        else:
            ids = [special.cls, *a[:max_length - 2], special.sep]
            types = [0] * len(ids)
        features.append(ClassificationFeature(ids, types, _label_value(ex, label_to_id), i))
    return features


def truncate_longest_first(n_a: int, n_b: int, room: int) -> tuple[int, int]:
    """The lengths of A and B that HF tokenizers' longest-first truncation keeps of a pair cut to ``room`` tokens."""
    if n_a + n_b <= room:
        return n_a, n_b
    short, long_ = min(n_a, n_b), max(n_a, n_b)
    if short + short > room:  # both are cut: half each, the odd token to the longer (to B on a tie)
        short, long_ = room // 2, room - room // 2
    else:
        long_ = room - short
    return (long_, short) if n_a > n_b else (short, long_)


def _label_value(ex: ClassificationExample, label_to_id: Optional[dict[str, int]]):
    if ex.label is None:
        return None
    if label_to_id is not None:
        if ex.label not in label_to_id:
            raise TaskDataError(f"{ex.source}: label {ex.label!r} is not in the label list {_shown(label_to_id)}")
        return label_to_id[ex.label]
    try:
        value = float(ex.label)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise TaskDataError(f"{ex.source}: label {ex.label!r} is not a finite number; expected a regression target")
    return value


def _shown(label_to_id: dict[str, int], limit: int = 20) -> str:
    names = list(label_to_id)
    more = f", ... ({len(names)} labels)" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


# ---------------------------------------------------------------------------------------------
# Token classification
# ---------------------------------------------------------------------------------------------

def encode_tokens(tokenizer, sentences: Sequence[TokenSentence], max_length: int,
                  label_to_id: Optional[dict[str, int]], label_all_subtokens: bool = False,
                  stride: Optional[int] = None) -> list[TokenFeature]:
    """Features of pre-split sentences, one per window (see the module doc).  ``stride``: tokens
    between window starts (default half of ``max_length - 2``).  Untagged sentences, or all with
    ``label_to_id=None`` (prediction only), get ``labels=None``."""
    room = max_length - 2
    if room < 1:
        raise ValueError(f"max_length must be >= 3 ([CLS] word [SEP]), got {max_length}")
    stride = max(1, room // 2) if stride is None else stride
    if not 1 <= stride <= room:
        raise ValueError(f"stride must be in [1, max_length - 2 = {room}], got {stride}")
    tokenizer, special = _prepare(tokenizer)
    continuation = _continuation_ids(label_to_id) if label_all_subtokens and label_to_id else None
    # RoBERTa's words each get the space before them (Ġ), as transformers' add_prefix_space=True gives
    space = " " if special.roberta else ""
    encodings = tokenizer.encode_batch([[space + w for w in s.tokens] for s in sentences], is_pretokenized=True,
                                       add_special_tokens=False) if sentences else []
    features = []
    for index, (sentence, encoding) in enumerate(zip(sentences, encodings)):
        pieces = _word_pieces(encoding, len(sentence.tokens), special.unk)
        tag_ids = None if sentence.tags is None or label_to_id is None else _tag_ids(sentence, label_to_id)
        for span in _word_windows([len(p) for p in pieces], room, stride):
            features.append(_token_feature(pieces, tag_ids, span, room, special, continuation, index))
    return features


def _word_pieces(encoding, n_words: int, unk_id: int) -> list[list[int]]:
    pieces: list[list[int]] = [[] for _ in range(n_words)]
    for token_id, word in zip(encoding.ids, encoding.word_ids):
        pieces[word].append(token_id)
    return [p or [unk_id] for p in pieces]


def _tag_ids(sentence: TokenSentence, label_to_id: dict[str, int]) -> list[int]:
    missing = next((i for i, tag in enumerate(sentence.tags) if tag not in label_to_id), None)
    if missing is not None:
        raise TaskDataError(f"{sentence.where(missing)}: tag {sentence.tags[missing]!r} is not in the label list "
                            f"{_shown(label_to_id)}")
    return [label_to_id[tag] for tag in sentence.tags]


def _continuation_ids(label_to_id: dict[str, int]) -> dict[int, int]:
    """Tag id -> the id a word's later sub-tokens get: ``I-X`` for ``B-X`` where it exists, else itself."""
    table = {i: i for i in label_to_id.values()}
    for tag, i in label_to_id.items():
        if tag.startswith("B-") and "I-" + tag[2:] in label_to_id:
            table[i] = label_to_id["I-" + tag[2:]]
    return table


def _word_windows(lengths: list[int], room: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(first, end, own_first, own_end) word ranges of the windows over words of ``lengths`` tokens."""
    n = len(lengths)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)  # starts[w]: first token of word w; starts[n]: total
    spans, first = [], 0
    while True:
        end = bisect.bisect_right(starts, starts[first] + room) - 1  # words that fit whole
        end = max(end, min(first + 1, n))  # a word longer than a window is cut, never skipped
        spans.append((first, end))
        if end >= n:
            break
        first = min(bisect.bisect_left(starts, starts[first] + stride, first + 1, n), end)
    windows, own = [], 0
    for k, (first, end) in enumerate(spans):
        own_end = n if k + 1 == len(spans) else (spans[k + 1][0] + end) // 2  # middle of the overlap
        if own_end > own or len(spans) == 1:
            windows.append((first, end, own, own_end))
        own = own_end
    return windows


def _token_feature(pieces, tag_ids, span, room, special: _Specials, continuation, index) -> TokenFeature:
    first, end, own_first, own_end = span
    ids, word_ids = [special.cls], [None]
    labels = None if tag_ids is None else [IGNORE_INDEX]
    for w in range(first, end):
        piece = pieces[w][:room]
        ids += piece
        word_ids += [w] * len(piece)
        if labels is not None:
            if own_first <= w < own_end:
                rest = IGNORE_INDEX if continuation is None else continuation[tag_ids[w]]
                labels += [tag_ids[w]] + [rest] * (len(piece) - 1)
            else:
                labels += [IGNORE_INDEX] * len(piece)
    ids.append(special.sep)
    word_ids.append(None)
    if labels is not None:
        labels.append(IGNORE_INDEX)
    return TokenFeature(ids, [0] * len(ids), labels, word_ids, (own_first, own_end), len(pieces), index)


def word_predictions(features: Sequence[TokenFeature], logits_or_ids) -> list[list[int]]:
    """Per sentence (by example index), the predicted tag id of every word: read at the word's first
    sub-token in the window that owns it.  ``logits_or_ids``: per feature (in order) logits
    ``(tokens, tags)`` or predicted ids ``(tokens,)``; padded rows and tensors are fine."""
    if len(features) != len(logits_or_ids):
        raise ValueError(f"{len(features)} features but {len(logits_or_ids)} predictions")
    out: dict[int, list[Optional[int]]] = {}
    for feature, row in zip(features, logits_or_ids):
        row = _as_numpy(row)
        ids = row.argmax(-1) if row.ndim == 2 else row
        words = out.setdefault(feature.example_index, [None] * feature.num_words)
        previous = None
        for i, w in enumerate(feature.word_ids):
            if w is not None and w != previous and feature.owned_words[0] <= w < feature.owned_words[1]:
                words[w] = int(ids[i])
            previous = w
    result = [out.get(i) for i in range(max(out, default=-1) + 1)]
    for i, words in enumerate(result):
        if words is None or None in words:
            raise ValueError(f"sentence {i} has words without a prediction; pass every feature encode_tokens made")
    return result


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Extractive question answering
# ---------------------------------------------------------------------------------------------

def encode_squad(tokenizer, examples: Sequence[QAExample], max_length: int = 384, doc_stride: int = 128,
                 max_query_length: int = 64) -> list[SquadFeature]:
    """Features of SQuAD questions, one per context window (see the module doc)."""
    if doc_stride < 1:
        raise ValueError(f"doc_stride must be >= 1, got {doc_stride}")
    tokenizer, special = _prepare(tokenizer)
    framing = 2 + len(special.between)  # [CLS] question [SEP] ([SEP]) context [SEP]
    if max_length <= max_query_length + framing:
        raise ValueError(f"max_length ({max_length}) must be greater than max_query_length ({max_query_length}) "
                         f"+ {framing}")
    unique = list(dict.fromkeys(ex.context for ex in examples))  # SQuAD asks several questions per context
    contexts = dict(zip(unique, _encode(tokenizer, unique)))
    questions = _encode(tokenizer, [ex.question for ex in examples])
    features = []
    for index, (ex, question) in enumerate(zip(examples, questions)):
        context = contexts[ex.context]
        query = question.ids[:max_query_length]
        answer = None if ex.is_impossible or not ex.answers else _answer_tokens(context.offsets, ex.answers[0])
        spans = _doc_spans(len(context.ids), max_length - len(query) - 2 - len(special.between), doc_stride)
        for k in range(len(spans)):
            features.append(_squad_feature(query, context, spans, k, answer, special, index))
    return features


def _answer_tokens(offsets: list[tuple[int, int]], answer) -> Optional[tuple[int, int]]:
    """First and last context tokens overlapping the answer's characters (None if none do)."""
    first = next((i for i, (_, end) in enumerate(offsets) if end > answer.start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < answer.end), None)
    return None if first is None or last is None or last < first else (first, last)


def _doc_spans(n_tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) windows of the context tokens, BERT's: at least one, even for an empty context."""
    spans, start = [], 0
    while True:
        length = min(n_tokens - start, room)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, stride)


def _is_max_context(spans: list[tuple[int, int]], k: int, position: int) -> bool:
    """Whether window ``k`` is where context token ``position`` has the most context on both sides."""
    best, best_score = None, None
    for j, (start, length) in enumerate(spans):
        if start <= position < start + length:
            score = min(position - start, start + length - 1 - position) + 0.01 * length
            if best_score is None or score > best_score:
                best, best_score = j, score
    return best == k


def _squad_feature(query, context, spans, k, answer, special: _Specials, index) -> SquadFeature:
    start, length = spans[k]
    base = len(query) + 1 + len(special.between)  # index of the window's first context token
    ids = [special.cls, *query, *special.between, *context.ids[start:start + length], special.sep]
    types = special.pair_types(base - 1, length + 1)
    offsets = [None] * base + [tuple(o) for o in context.offsets[start:start + length]] + [None]
    max_context = [False] * base + [_is_max_context(spans, k, start + i) for i in range(length)] + [False]
    start_position = end_position = 0
    if answer is not None and start <= answer[0] and answer[1] < start + length:
        start_position, end_position = answer[0] - start + base, answer[1] - start + base
    return SquadFeature(ids, types, start_position, end_position, offsets, max_context, index)


def decode_squad(examples: Sequence[QAExample], features: Sequence[SquadFeature], start_logits, end_logits,
                 n_best: int = 20, max_answer_length: int = 30, version_2: bool = False,
                 null_score_diff_threshold: float = 0.0) -> QAPredictions:
    """Answer texts from per-feature start/end logits (see the module doc; padded rows are fine).

    v1: the best span ("" when no span is valid).  v2: "" when the null score beats the best span by
    more than ``null_score_diff_threshold``; ``null_score_diff`` is inf when no span is valid."""
    if not len(features) == len(start_logits) == len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)} start and {len(end_logits)} end logits")
    windows = defaultdict(list)
    for feature, starts, ends in zip(features, start_logits, end_logits):
        n = len(feature.input_ids)
        windows[feature.example_index].append((feature, _as_numpy(starts)[:n], _as_numpy(ends)[:n]))
    predictions = QAPredictions({})
    for index, example in enumerate(examples):
        candidates, null = _span_candidates(example, windows[index], n_best, max_answer_length)
        if version_2 and null is not None:
            candidates.append(null)
        candidates.sort(key=lambda c: c[0] + c[1], reverse=True)  # stable: the null answer last among ties
        nbest, seen = [], set()
        for start_logit, end_logit, text in candidates:
            if len(nbest) == n_best:
                break
            if text not in seen:
                seen.add(text)
                nbest.append((start_logit, end_logit, text))
        if version_2 and null is not None and "" not in seen:
            nbest.append(null)
        best = next((c for c in nbest if c[2]), None)
        if version_2:
            null_score = null[0] + null[1] if null is not None else -math.inf
            diff = null_score - (best[0] + best[1]) if best is not None else math.inf
            predictions.null_score_diff[example.id] = diff
            predictions.answers[example.id] = "" if best is None or diff > null_score_diff_threshold else best[2]
        else:
            predictions.answers[example.id] = nbest[0][2] if nbest else ""
        predictions.n_best[example.id] = _nbest_entries(nbest)
    return predictions


def _span_candidates(example: QAExample, windows, n_best: int, max_answer_length: int):
    """([(start_logit, end_logit, text)] of the valid spans, the null answer with the lowest score)."""
    candidates, null = [], None
    for feature, starts, ends in windows:
        if null is None or starts[0] + ends[0] < null[0] + null[1]:
            null = (float(starts[0]), float(ends[0]), "")
        best_ends = _top(ends, n_best)
        for i in _top(starts, n_best):
            if feature.offsets[i] is None or not feature.token_is_max_context[i]:
                continue
            for j in best_ends:
                if feature.offsets[j] is None or j < i or j - i + 1 > max_answer_length:
                    continue
                text = example.context[feature.offsets[i][0]:feature.offsets[j][1]]
                candidates.append((float(starts[i]), float(ends[j]), text))
    return candidates, null


def _top(logits: np.ndarray, n: int) -> list[int]:
    return np.argsort(-logits, kind="stable")[:n].tolist()


def _nbest_entries(nbest: list[tuple[float, float, str]]) -> list[dict]:
    if not nbest:
        return []
    scores = np.array([s + e for s, e, _ in nbest])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return [{"text": text, "probability": float(p), "start_logit": s, "end_logit": e}
            for (s, e, text), p in zip(nbest, probs)]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def collate(features: Sequence[Union[ClassificationFeature, TokenFeature, SquadFeature]], pad_id: int,
            pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pad features to the batch's longest (rounded up to ``pad_to_multiple_of``): ``input_ids``,
    ``token_type_ids``, ``attention_mask`` (1 = real token), and the targets the features carry:
    ``labels`` (per example, or per token padded with IGNORE_INDEX) or ``start_positions`` and
    ``end_positions``."""
    kinds = {type(f) for f in features}
    if len(kinds) != 1:
        raise ValueError(f"a batch needs features of one kind, got {sorted(k.__name__ for k in kinds)}")
    longest = max(len(f.input_ids) for f in features)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(features)
    batch = {"input_ids": np.full((n, width), pad_id, dtype=np.int64),
             "token_type_ids": np.zeros((n, width), dtype=np.int64),
             "attention_mask": np.zeros((n, width), dtype=np.int64)}
    for i, f in enumerate(features):
        batch["input_ids"][i, :len(f.input_ids)] = f.input_ids
        batch["token_type_ids"][i, :len(f.input_ids)] = f.token_type_ids
        batch["attention_mask"][i, :len(f.input_ids)] = 1
    kind = kinds.pop()
    if kind is SquadFeature:
        batch["start_positions"] = np.array([f.start_position for f in features], dtype=np.int64)
        batch["end_positions"] = np.array([f.end_position for f in features], dtype=np.int64)
    elif kind is TokenFeature and _labeled(features, "labels"):
        batch["labels"] = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        for i, f in enumerate(features):
            batch["labels"][i, :len(f.labels)] = f.labels
    elif kind is ClassificationFeature and _labeled(features, "label"):
        regression = isinstance(features[0].label, float)
        batch["labels"] = np.array([f.label for f in features], dtype=np.float32 if regression else np.int64)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _labeled(features, name: str) -> bool:
    labeled = [getattr(f, name) is not None for f in features]
    if any(labeled) and not all(labeled):
        raise ValueError("a batch mixes labeled and unlabeled features")
    return all(labeled)
