"""Fine-tuning metrics, written to give the reference scripts' numbers.

- Classification and regression (GLUE): the definitions of ``sklearn.metrics`` (accuracy_score,
  f1_score, matthews_corrcoef) and ``scipy.stats`` (pearsonr, spearmanr).
- Entity level (NER, chunking): the chunk rules of conlleval.pl (CoNLL-2000/2003).
- Question answering: the official SQuAD v2.0 evaluation script (evaluate-v2.0.py), which gives
  v1.1's numbers on v1.1 data.

Scales: classification, regression and entity scores are fractions ([0, 1], or [-1, 1] for
correlations), as sklearn and seqeval give them; SQuAD scores are percentages, as the official
scripts print them.  Pure Python and numpy: sklearn and scipy are only the tests' references.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Classification and regression
# ---------------------------------------------------------------------------------------------


def _pair(pred: Any, gold: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``gold`` as 1-D arrays of one non-zero length, else a ValueError from ``name``."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.ndim != 1 or gold.ndim != 1:
        raise ValueError(f"{name}: pred and gold must be 1-D, got shapes {pred.shape} and {gold.shape}")
    if len(pred) != len(gold):
        raise ValueError(f"{name}: pred has {len(pred)} items but gold has {len(gold)}")
    if len(pred) == 0:
        raise ValueError(f"{name}: pred and gold are empty")
    return pred, gold


def _confusion(pred: np.ndarray, gold: np.ndarray) -> tuple[list, np.ndarray]:
    """(labels, counts): the sorted labels of gold and pred together, counts[gold, pred]."""
    labels, index = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, (index[:len(gold)], index[len(gold):]), 1)
    return labels.tolist(), counts


def accuracy(pred: Sequence, gold: Sequence) -> float:
    """Fraction of items where pred equals gold (sklearn's accuracy_score)."""
    pred, gold = _pair(pred, gold, "accuracy")
    return float(np.mean(pred == gold))


def f1_binary(pred: Sequence, gold: Sequence, positive: Any = 1) -> float:
    """F1 of the ``positive`` label, sklearn's ``f1_score(average='binary', pos_label=positive)``:
    2 tp / (2 tp + fp + fn), and 0 when there is no positive in gold or pred (sklearn's default)."""
    pred, gold = _pair(pred, gold, "f1_binary")
    labels, _ = _confusion(pred, gold)
    if len(labels) > 2:
        raise ValueError(f"f1_binary: {len(labels)} distinct labels {labels}; binary F1 takes at most 2 "
                         "(use f1_macro)")
    if len(labels) == 2 and positive not in labels:
        raise ValueError(f"f1_binary: positive={positive!r} is not one of the labels {labels}")
    true_positive = int(np.sum((pred == positive) & (gold == positive)))
    denominator = int(np.sum(pred == positive)) + int(np.sum(gold == positive))
    return 2 * true_positive / denominator if denominator else 0.0


def f1_macro(pred: Sequence, gold: Sequence) -> float:
    """Unweighted mean of the per-label F1 over the labels present in gold or pred (sklearn's
    ``average='macro'``).  No label of that set has a zero denominator, so no zero-division case."""
    pred, gold = _pair(pred, gold, "f1_macro")
    _, counts = _confusion(pred, gold)
    per_label = 2 * np.diag(counts) / (counts.sum(axis=0) + counts.sum(axis=1))
    return float(np.mean(per_label))


def matthews(pred: Sequence, gold: Sequence) -> float:
    """Matthews correlation, multiclass (Gorodkin's R_K, as sklearn's matthews_corrcoef):
    (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c correct items, s items, t and p the per-label
    gold and pred counts; 0 when the denominator is 0 (one class in gold or in pred), as sklearn."""
    pred, gold = _pair(pred, gold, "matthews")
    _, counts = _confusion(pred, gold)
    gold_counts, pred_counts = counts.sum(axis=1).tolist(), counts.sum(axis=0).tolist()
    correct, total = int(np.trace(counts)), len(gold)
    # Python ints: exact, and no overflow of s^4 for large evaluation sets.
    cov_gold_pred = correct * total - sum(t * p for t, p in zip(gold_counts, pred_counts))
    cov_pred = total * total - sum(p * p for p in pred_counts)
    cov_gold = total * total - sum(t * t for t in gold_counts)
    if cov_pred * cov_gold == 0:
        return 0.0
    return cov_gold_pred / math.sqrt(cov_pred * cov_gold)


def _real_pair(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two finite float arrays of one length >= 2 (scipy's minimum for a correlation)."""
    x, y = _pair(x, y, name)
    x, y = x.astype(np.float64), y.astype(np.float64)
    if len(x) < 2:
        raise ValueError(f"{name}: a correlation needs at least 2 items, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{name}: inputs hold NaN or infinite values")
    return x, y


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r the way scipy.stats.pearsonr computes it: NaN for a constant input, centred
    vectors scaled by their largest entry before the norm, the product clipped to [-1, 1]."""
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    xmax, ymax = np.max(np.abs(xm)), np.max(np.abs(ym))
    r = float(np.dot(xm / (xmax * np.linalg.norm(xm / xmax)), ym / (ymax * np.linalg.norm(ym / ymax))))
    r = min(max(r, -1.0), 1.0)
    return float(round(r)) if len(x) == 2 else r   # scipy returns exactly +-1 for two points


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (scipy.stats.pearsonr's statistic); NaN when an input is constant."""
    return _correlation(*_real_pair(x, y, "pearson"))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Each run of equal values [first, last] gets (first + last) / 2 + 1.
    new_run = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    run_id = np.cumsum(new_run) - 1
    first = np.flatnonzero(new_run)
    last = np.concatenate([first[1:], [len(values)]]) - 1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = (first[run_id] + last[run_id]) / 2.0 + 1.0
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation: Pearson's r of the average-tie ranks (scipy.stats.spearmanr's
    statistic); NaN when an input is constant."""
    x, y = _real_pair(x, y, "spearman")
    return _correlation(_average_ranks(x), _average_ranks(y))


def classification_metrics(pred: Sequence[int], gold: Sequence[int], num_labels: int,
                           with_matthews: bool = False) -> dict[str, float]:
    """GLUE classification scores of integer labels in [0, num_labels).

    Keys: ``accuracy`` always; ``f1`` (label 1 positive) when num_labels is 2 (MRPC, QQP);
    ``matthews`` when ``with_matthews`` (CoLA's metric)."""
    p, g = _pair(pred, gold, "classification_metrics")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"classification_metrics: num_labels must be an int >= 2, got {num_labels!r}")
    for name, labels in (("pred", p), ("gold", g)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"classification_metrics: {name} must hold integer labels, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(f"classification_metrics: {name} holds labels outside [0, {num_labels}): "
                             f"min {labels.min()}, max {labels.max()}")
    scores = {"accuracy": accuracy(p, g)}
    if num_labels == 2:
        scores["f1"] = f1_binary(p, g, positive=1)
    if with_matthews:
        scores["matthews"] = matthews(p, g)
    return scores


def regression_metrics(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """GLUE regression scores (STS-B).  Keys: ``pearson``, ``spearman``."""
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}


# ---------------------------------------------------------------------------------------------
# Entity level: conlleval.pl's chunks
# ---------------------------------------------------------------------------------------------

# Prefix letters each scheme may use.  conlleval has no notion of a scheme (one set of rules
# reads them all); the scheme only says which tags are valid.  IOB1 and IOB2 (= BIO) differ in
# when B- is written, not in how chunks are read.
SCHEMES = {"iob1": "BI", "iob2": "BI", "bio": "BI", "bioes": "BIES", "iobes": "BIES"}


def _split_tag(tag: Any, letters: str, scheme: str, where: str) -> tuple[str, str]:
    """(prefix, type) of a tag: "O" is ("O", ""); else the prefix is what precedes the first
    hyphen and the type is the rest, hyphens included (conlleval's 2004-01-26 rule)."""
    if tag == "O":
        return "O", ""
    prefix, hyphen, kind = tag.partition("-") if isinstance(tag, str) else ("", "", "")
    if not hyphen or not kind or prefix not in letters or len(prefix) != 1:
        allowed = "/".join(f"{letter}-" for letter in letters)
        raise ValueError(f"{where}: tag {tag!r} is not a {scheme} tag (O, or {allowed} and a type)")
    return prefix, kind


# conlleval.pl's endOfChunk and startOfChunk (version 2004-01-26), with the S- rules of its
# BIOES extension (as in seqeval's port).  On B/I/O tags they are exactly conlleval's:
#   a chunk ends before this token when the previous tag was B or I and this one is B or O, or
#     the type changes after a non-O tag;
#   a chunk starts at this token when it is B, or it is I after O (so I- after O opens a chunk
#     in IOB1 and IOB2 alike), or the type changes at a non-O tag.
# BIOES adds: a chunk always ends after E or S, and before S; E and I start a chunk after E, S
# or O.  The sentence boundary reads as an O of no type, which closes the last chunk.


def _chunk_ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    return (prev in "ES" or (prev in "BI" and tag in "BSO")
            or (prev != "O" and prev_type != kind))


def _chunk_starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    return (tag in "BS" or (tag in "EI" and prev in "ESO")
            or (tag != "O" and prev_type != kind))


def _chunks(tags: Sequence[str], scheme: str, where: str) -> list[tuple[str, int, int]]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tagging scheme {scheme!r}; one of {sorted(SCHEMES)}")
    letters = SCHEMES[scheme]
    chunks, start = [], None
    prev, prev_type = "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split_tag(tag, letters, scheme, f"{where}, token {i}")
        if start is not None and _chunk_ends(prev, prefix, prev_type, kind):
            chunks.append((prev_type, start, i))
            start = None
        if _chunk_starts(prev, prefix, prev_type, kind):
            start = i
        prev, prev_type = prefix, kind
    return chunks


def entities(tags: Sequence[str], scheme: str = "iob2") -> list[tuple[str, int, int]]:
    """The chunks of one sentence's tags as (type, start, end), end exclusive, in order.

    ``scheme``: "iob1", "iob2" (alias "bio"), "bioes" (alias "iobes").  A tag outside the scheme
    is a ValueError naming it.  Ill-formed sequences are read as conlleval reads them: I- after O
    or after another type opens a chunk; a BIOES chunk need not close with E-."""
    if isinstance(tags, str):
        raise ValueError("entities: tags must be a sequence of tags, not one string")
    return _chunks(tags, scheme, "entities")


def _prf(correct: int, found_pred: int, found_gold: int) -> dict[str, float]:
    # conlleval: precision 0 without predicted chunks, recall 0 without gold ones, F 0 when both are 0.
    precision = correct / found_pred if found_pred else 0.0
    recall = correct / found_gold if found_gold else 0.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": fscore,
            "found_pred": found_pred, "found_gold": found_gold, "correct": correct}


def entity_scores(pred_sentences: Sequence[Sequence[str]], gold_sentences: Sequence[Sequence[str]],
                  scheme: str = "iob2") -> dict[str, Any]:
    """conlleval's scores: a predicted chunk is correct when a gold chunk has its type, start and end.

    Keys: ``precision``, ``recall``, ``f1`` (micro over all chunks), ``accuracy`` (of tags),
    ``found_pred``, ``found_gold``, ``correct`` (chunk counts), and ``per_type``: for each chunk
    type in gold or pred, sorted, a dict of the same keys less ``accuracy``."""
    if len(pred_sentences) != len(gold_sentences):
        raise ValueError(f"entity_scores: {len(pred_sentences)} pred sentences but "
                         f"{len(gold_sentences)} gold sentences")
    if len(gold_sentences) == 0:
        raise ValueError("entity_scores: no sentences")
    pred_chunks, gold_chunks = set(), set()
    correct_tags = tokens = 0
    for index, (pred, gold) in enumerate(zip(pred_sentences, gold_sentences)):
        if isinstance(pred, str) or isinstance(gold, str) or len(pred) != len(gold):
            raise ValueError(f"entity_scores: sentence {index} must be two tag sequences of one length, "
                             f"got {pred!r} and {gold!r}")
        pred_chunks.update((index, *c) for c in _chunks(pred, scheme, f"pred sentence {index}"))
        gold_chunks.update((index, *c) for c in _chunks(gold, scheme, f"gold sentence {index}"))
        correct_tags += sum(p == g for p, g in zip(pred, gold))
        tokens += len(gold)
    correct_chunks = pred_chunks & gold_chunks
    scores = _prf(len(correct_chunks), len(pred_chunks), len(gold_chunks))
    scores["accuracy"] = correct_tags / tokens if tokens else 0.0

    def by_type(chunks: set) -> collections.Counter:
        return collections.Counter(kind for _, kind, _, _ in chunks)

    found_pred, found_gold, correct = by_type(pred_chunks), by_type(gold_chunks), by_type(correct_chunks)
    scores["per_type"] = {kind: _prf(correct[kind], found_pred[kind], found_gold[kind])
                          for kind in sorted(set(found_pred) | set(found_gold))}
    return scores


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0: the official evaluation scripts' rules
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official normalisation, in its order: lower case, drop ASCII punctuation, replace the
    articles a/an/the (whole words) by a space, collapse whitespace."""
    if not isinstance(s, str):
        raise ValueError(f"normalize_answer: expected a string, got {type(s).__name__}")
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _gold_list(answers: Any, name: str) -> list[str]:
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{name}: answers must be a list of strings (empty when unanswerable), got {answers!r}")
    # evaluate-v2.0.py: gold answers that normalise to nothing are dropped; none left means the only
    # right answer is the empty string.
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def _check_prediction(prediction: Any, name: str) -> None:
    if not isinstance(prediction, str):
        raise ValueError(f"{name}: prediction must be a string, got {type(prediction).__name__}")


def _exact(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def _token_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)   # v2.0: no-answer scores 1 only against no-answer
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0.
    ``answers`` empty (or all normalising to nothing): unanswerable, only "" is right."""
    _check_prediction(prediction, "exact_match")
    return max(_exact(gold, prediction) for gold in _gold_list(answers, "exact_match"))


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 (bag of normalised tokens), the best over the gold answers; an empty gold or
    prediction scores 1.0 when both are empty, else 0.0 (v2.0's rule)."""
    _check_prediction(prediction, "f1")
    return max(_token_f1(gold, prediction) for gold in _gold_list(answers, "f1"))


def _answer_texts(answers: Any, qid: str) -> list[str]:
    """Gold texts from a list of strings, the official [{"text": ...}, ...] or HF {"text": [...]}."""
    if isinstance(answers, Mapping) and "text" in answers:
        answers = answers["text"]
    if isinstance(answers, (list, tuple)):
        texts = [a["text"] if isinstance(a, Mapping) and "text" in a else a for a in answers]
        if all(isinstance(t, str) for t in texts):
            return list(texts)
    raise ValueError(f"squad_scores: question {qid!r}: answers must be a list of strings, of "
                     f'{{"text": ...}} or {{"text": [...]}}, got {answers!r}')


def _best_threshold(predictions: Mapping[str, str], raw: dict[str, float],
                    na_probs: Mapping[str, float], has_answer: dict[str, bool]) -> tuple[float, float]:
    """evaluate-v2.0.py's find_best_thresh: start from "every question unanswered" (the NoAns ones
    right), then answer the questions in increasing no-answer probability (stable, in na_probs'
    order) and keep the best total and the probability where it was reached (first best, ties
    not grouped, as the official script)."""
    score = best = sum(not h for h in has_answer.values())
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if qid not in raw:
            continue
        if has_answer[qid]:
            score += raw[qid]
        elif predictions[qid]:
            score -= 1
        if score > best:
            best, best_thresh = score, float(na_probs[qid])
    return 100.0 * best / len(raw), best_thresh


def _averages(exact: dict[str, float], f1s: dict[str, float], qids: list[str]) -> dict[str, float]:
    return {"exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
            "f1": 100.0 * sum(f1s[q] for q in qids) / len(qids), "total": len(qids)}


def squad_scores(predictions: Mapping[str, str], dataset_examples: Iterable[Mapping[str, Any]],
                 na_probs: Optional[Mapping[str, float]] = None,
                 na_prob_thresh: float = 1.0) -> dict[str, float]:
    """SQuAD scores as evaluate-v2.0.py gives them (percentages).

    ``dataset_examples``: dicts with ``id`` and ``answers`` (a list of strings, the official
    [{"text": ...}], or HF's {"text": [...]}; empty for an unanswerable v2 question).
    ``predictions``: id -> answer text ("" for no answer) for every example; extra ids are ignored.
    ``na_probs``: id -> no-answer probability; a question whose probability exceeds
    ``na_prob_thresh`` counts as answered "no answer".

    Keys: ``exact``, ``f1``, ``total``; ``HasAns_exact/_f1/_total`` when some question has an
    answer and ``NoAns_...`` when some has none; with ``na_probs`` also ``best_exact``,
    ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` (the threshold search on raw scores).
    """
    gold: dict[str, list[str]] = {}
    for example in dataset_examples:
        if not isinstance(example, Mapping) or "id" not in example or "answers" not in example:
            raise ValueError(f"squad_scores: an example must be a dict with 'id' and 'answers', got {example!r}")
        qid = example["id"]
        if qid in gold:
            raise ValueError(f"squad_scores: question id {qid!r} appears twice in dataset_examples")
        gold[qid] = _answer_texts(example["answers"], qid)
    if not gold:
        raise ValueError("squad_scores: dataset_examples is empty")
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        raise ValueError(f"squad_scores: no prediction for {len(missing)} of {len(gold)} questions, "
                         f"e.g. {missing[:3]}")
    if na_probs is not None:
        missing = [qid for qid in gold if qid not in na_probs]
        if missing:
            raise ValueError(f"squad_scores: no na_prob for {len(missing)} of {len(gold)} questions, "
                             f"e.g. {missing[:3]}")

    has_answer = {qid: bool(answers) for qid, answers in gold.items()}   # before normalisation, as official
    exact = {qid: exact_match(predictions[qid], answers) for qid, answers in gold.items()}
    f1s = {qid: f1(predictions[qid], answers) for qid, answers in gold.items()}

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        if na_probs is None:
            return raw
        return {qid: float(not has_answer[qid]) if na_probs[qid] > na_prob_thresh else s
                for qid, s in raw.items()}

    exact_t, f1_t = thresholded(exact), thresholded(f1s)
    scores = _averages(exact_t, f1_t, list(gold))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, h in has_answer.items() if h == wanted]
        if qids:
            scores.update({f"{prefix}_{k}": v for k, v in _averages(exact_t, f1_t, qids).items()})
    if na_probs is not None:
        scores["best_exact"], scores["best_exact_thresh"] = _best_threshold(predictions, exact, na_probs, has_answer)
        scores["best_f1"], scores["best_f1_thresh"] = _best_threshold(predictions, f1s, na_probs, has_answer)
    return scores
