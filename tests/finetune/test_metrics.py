"""pretrain.finetune.metrics against hand-computed cases and the reference definitions.

References: sklearn.metrics and scipy.stats (random inputs, several seeds, ties); conlleval.pl's
counting loop, restated here over its rule tables (random, often ill-formed, tag sequences); the
SQuAD rules by hand (the official scripts are not a package).
"""
import collections
import math
import re
import warnings

import numpy as np
import pytest

from pretrain.finetune import metrics as M

TOL = 1e-12
SEEDS = range(6)


def close(actual, expected, tol=TOL):
    if math.isnan(expected):
        return math.isnan(actual)
    return abs(actual - expected) <= tol


# ---------------------------------------------------------------------------------------------
# Classification and regression: hand-computed
# ---------------------------------------------------------------------------------------------

PRED5, GOLD5 = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]   # tp 2 (0, 3), fp 1 (1), fn 1 (4), tn 1 (2)


def test_accuracy_by_hand():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5          # items 0 and 2 agree: 2/4
    assert M.accuracy(PRED5, GOLD5) == 3 / 5
    assert M.accuracy(["a", "b"], ["a", "b"]) == 1.0


def test_f1_binary_by_hand():
    assert M.f1_binary(PRED5, GOLD5) == pytest.approx(2 / 3, abs=TOL)              # 2*2 / (2*2 + 1 + 1)
    assert M.f1_binary(PRED5, GOLD5, positive=0) == pytest.approx(0.5, abs=TOL)    # tp 1, fp 1, fn 1: 2/4
    assert M.f1_binary([0, 0], [0, 0]) == 0.0        # no positive anywhere: sklearn's zero-division 0
    assert M.f1_binary([1, 1], [1, 1]) == 1.0


def test_f1_binary_rejects_what_sklearn_rejects():
    with pytest.raises(ValueError, match="3 distinct labels"):
        M.f1_binary([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="positive=1 is not one of the labels"):
        M.f1_binary([0, 2], [2, 0])


def test_f1_macro_by_hand():
    # labels 0..3 (3 only predicted): F1_0 = 2/(2) = 1; F1_1 = 2*1/(2+1) = 2/3; F1_2 = 0; F1_3 = 0
    assert M.f1_macro([0, 1, 1, 3], [0, 1, 2, 2]) == pytest.approx((1 + 2 / 3) / 4, abs=TOL)


def test_matthews_by_hand():
    # binary: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert M.matthews(PRED5, GOLD5) == pytest.approx(1 / 6, abs=TOL)
    # 3 classes: c = 4 correct, s = 6, t = [2, 2, 2], p = [2, 3, 1]:
    # (4*6 - (4+6+2)) / sqrt((36 - (4+9+1)) (36 - 12)) = 12 / sqrt(22*24)
    assert M.matthews([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / math.sqrt(528), abs=TOL)
    assert M.matthews([1, 1, 1], [0, 1, 1]) == 0.0     # one predicted class: denominator 0 -> 0
    assert M.matthews([0, 1, 0], [0, 1, 0]) == 1.0


def test_correlations_by_hand():
    # centred [-1, 0, 1] and [-1, 1, 0]: dot 1, norms sqrt(2) each: 1/2
    assert M.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=TOL)
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]; centred dot 4.5, squared norms 4.5 and 5: sqrt(0.9)
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=TOL)
    assert M.spearman([1, 5, 100], [0, 2, 3]) == pytest.approx(1.0, abs=TOL)   # monotone
    assert M.pearson([0, 1], [5, 3]) == -1.0                                 # two points: exactly -1
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))                        # constant: undefined, as scipy
    assert math.isnan(M.spearman([1, 2, 3], [4, 4, 4]))


def test_average_ranks():
    np.testing.assert_array_equal(M._average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])
    np.testing.assert_array_equal(M._average_ranks(np.array([0.5, 0.5])), [1.5, 1.5])


def test_glue_helpers():
    assert M.classification_metrics(PRED5, GOLD5, num_labels=2) == {
        "accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    cola = M.classification_metrics(PRED5, GOLD5, num_labels=2, with_matthews=True)
    assert cola["matthews"] == pytest.approx(1 / 6)
    assert set(M.classification_metrics([0, 2, 1], [0, 1, 1], num_labels=3)) == {"accuracy"}
    assert M.regression_metrics([1, 2, 3], [1, 3, 2]) == {"pearson": pytest.approx(0.5), "spearman": pytest.approx(0.5)}
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        M.classification_metrics([0, 3], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match="integer labels"):
        M.classification_metrics([0.0, 1.0], [0, 1], num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        M.classification_metrics([0, 0], [0, 0], num_labels=1)


@pytest.mark.parametrize("fn", [M.accuracy, M.f1_binary, M.f1_macro, M.matthews, M.pearson, M.spearman])
def test_inputs_validated(fn):
    with pytest.raises(ValueError, match="pred has 3 items but gold has 2"):
        fn([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0, 1]], [[0, 1]])


def test_correlation_inputs_validated():
    with pytest.raises(ValueError, match="at least 2"):
        M.pearson([1.0], [2.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.spearman([1.0, math.nan, 2.0], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# Classification and regression: against sklearn and scipy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_against_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 50, 333):
        binary_pred, binary_gold = rng.integers(0, 2, n), rng.integers(0, 2, n)
        k = int(rng.integers(3, 6))
        multi_pred, multi_gold = rng.integers(0, k, n), rng.integers(0, k, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # sklearn's zero-division warnings on tiny n
            cases = [
                (M.accuracy(multi_pred, multi_gold), metrics.accuracy_score(multi_gold, multi_pred)),
                (M.f1_binary(binary_pred, binary_gold), metrics.f1_score(binary_gold, binary_pred)),
                (M.f1_binary(binary_pred, binary_gold, positive=0),
                 metrics.f1_score(binary_gold, binary_pred, pos_label=0)),
                (M.f1_macro(multi_pred, multi_gold), metrics.f1_score(multi_gold, multi_pred, average="macro")),
                (M.f1_macro(binary_pred, binary_gold), metrics.f1_score(binary_gold, binary_pred, average="macro")),
                (M.matthews(binary_pred, binary_gold), metrics.matthews_corrcoef(binary_gold, binary_pred)),
                (M.matthews(multi_pred, multi_gold), metrics.matthews_corrcoef(multi_gold, multi_pred)),
                # a predictor stuck on one class: MCC's zero denominator
                (M.matthews(np.zeros(n, int), multi_gold), metrics.matthews_corrcoef(multi_gold, np.zeros(n, int))),
            ]
        for i, (ours, reference) in enumerate(cases):
            assert close(ours, float(reference)), (n, i, ours, reference)


@pytest.mark.parametrize("seed", SEEDS)
def test_against_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    for n in (2, 3, 10, 101, 1000):
        continuous = rng.normal(size=n), rng.normal(size=n) * 3 + 1
        tied = rng.integers(0, 4, n).astype(float), rng.integers(0, 6, n) * 0.5   # many ties
        mixed = rng.normal(size=n).round(1), rng.normal(size=n) + continuous[0]  # correlated
        for x, y in (continuous, tied, mixed):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # scipy's constant-input warning
                expected_r, expected_rho = stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic
            assert close(M.pearson(x, y), float(expected_r)), (n, x, y)
            assert close(M.spearman(x, y), float(expected_rho)), (n, x, y)


# ---------------------------------------------------------------------------------------------
# Entities: conlleval's chunk rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags, scheme, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], "iob2", [("PER", 0, 2), ("LOC", 3, 4)]),
    # IOB1: B- only between two adjacent chunks of one type
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob1", [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)]),
    # I- after O (or at the sentence start) opens a chunk, in IOB2 too
    (["O", "I-ORG", "I-ORG"], "iob2", [("ORG", 1, 3)]),
    (["I-ORG", "O"], "iob2", [("ORG", 0, 1)]),
    # a type change mid-chunk ends one chunk and starts another
    (["B-PER", "I-LOC", "I-LOC"], "iob2", [("PER", 0, 1), ("LOC", 1, 3)]),
    (["I-PER", "I-LOC"], "iob1", [("PER", 0, 1), ("LOC", 1, 2)]),
    (["B-PER", "B-PER"], "iob2", [("PER", 0, 1), ("PER", 1, 2)]),
    # a chunk at the sentence end is closed by the boundary
    (["O", "B-MISC", "I-MISC"], "iob2", [("MISC", 1, 3)]),
    # nested-looking: a location inside an organisation name is read flat, in three chunks
    (["B-ORG", "I-ORG", "B-LOC", "I-ORG"], "iob2", [("ORG", 0, 2), ("LOC", 2, 3), ("ORG", 3, 4)]),
    (["B-PER", "I-PER", "I-LOC", "I-PER"], "iob2", [("PER", 0, 2), ("LOC", 2, 3), ("PER", 3, 4)]),
    # hyphens in a type stay in the type (conlleval 2004-01-26)
    (["B-ORG-X", "I-ORG-X"], "iob2", [("ORG-X", 0, 2)]),
    (["O", "O"], "iob2", []),
    ([], "iob2", []),
    # BIOES: S- is a chunk of one; E- closes; E- or I- after E-/S-/O opens
    (["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"], "bioes", [("PER", 0, 1), ("LOC", 1, 4), ("LOC", 4, 5)]),
    (["B-PER", "E-PER", "E-PER"], "bioes", [("PER", 0, 2), ("PER", 2, 3)]),
    (["B-PER", "E-PER", "I-PER", "E-PER"], "iobes", [("PER", 0, 2), ("PER", 2, 4)]),
    (["O", "E-PER"], "bioes", [("PER", 1, 2)]),
    (["B-PER", "S-PER"], "bioes", [("PER", 0, 1), ("PER", 1, 2)]),
    (["B-PER", "I-PER", "O"], "bioes", [("PER", 0, 2)]),            # unclosed B-: still a chunk
    (["B-PER", "I-PER", "E-LOC"], "bioes", [("PER", 0, 2), ("LOC", 2, 3)]),
])
def test_entities(tags, scheme, expected):
    assert M.entities(tags, scheme) == expected


def test_one_annotation_in_three_schemes():
    # PER[0, 2) PER[2, 3) LOC[4, 5)
    expected = [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)]
    assert M.entities(["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob1") == expected
    assert M.entities(["B-PER", "I-PER", "B-PER", "O", "B-LOC"], "iob2") == expected
    assert M.entities(["B-PER", "E-PER", "S-PER", "O", "S-LOC"], "bioes") == expected


@pytest.mark.parametrize("tags, scheme", [
    (["B-PER", "E-PER"], "iob2"),
    (["S-PER"], "iob1"),
    (["X-PER"], "bioes"),
    (["B-"], "iob2"),
    (["B"], "iob2"),
    (["O-PER"], "iob2"),
    (["b-per"], "iob2"),
    (["BI-PER"], "bioes"),
    ([None], "iob2"),
])
def test_tags_outside_the_scheme(tags, scheme):
    with pytest.raises(ValueError, match=re.escape(f"token {len(tags) - 1}: tag {tags[-1]!r} is not a {scheme} tag")):
        M.entities(tags, scheme)


def test_entity_errors_name_the_sentence():
    with pytest.raises(ValueError, match=r"pred sentence 1, token 2: tag 'E-LOC'"):
        M.entity_scores([["O"], ["O", "B-LOC", "E-LOC"]], [["O"], ["O", "B-LOC", "I-LOC"]], scheme="iob2")
    with pytest.raises(ValueError, match="unknown tagging scheme 'ioe2'"):
        M.entities(["O"], "ioe2")
    with pytest.raises(ValueError, match="2 pred sentences but 1 gold"):
        M.entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="no sentences"):
        M.entity_scores([], [])
    with pytest.raises(ValueError, match="sentence 0 must be two tag sequences of one length"):
        M.entity_scores([["O", "O"]], [["O"]])


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"],             # PER[0,2) LOC[3,4)
            ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"]]    # ORG[0,3) PER[4,5)
    pred = [["B-PER", "I-PER", "O", "B-ORG"],             # PER[0,2) ORG[3,4)
            ["B-ORG", "I-ORG", "O", "B-MISC", "B-PER"]]   # ORG[0,2) MISC[3,4) PER[4,5)
    scores = M.entity_scores(pred, gold)
    # correct: the two PER chunks; 5 predicted, 4 gold
    assert (scores["correct"], scores["found_pred"], scores["found_gold"]) == (2, 5, 4)
    assert scores["precision"] == pytest.approx(2 / 5, abs=TOL)
    assert scores["recall"] == pytest.approx(2 / 4, abs=TOL)
    assert scores["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9, abs=TOL)    # 4/9
    assert scores["accuracy"] == pytest.approx(6 / 9, abs=TOL)           # tags: 3 of 4, 3 of 5
    assert list(scores["per_type"]) == ["LOC", "MISC", "ORG", "PER"]
    per = scores["per_type"]
    assert (per["PER"]["precision"], per["PER"]["recall"], per["PER"]["f1"]) == (1.0, 1.0, 1.0)
    assert (per["LOC"]["found_pred"], per["LOC"]["found_gold"], per["LOC"]["f1"]) == (0, 1, 0.0)
    assert (per["ORG"]["correct"], per["ORG"]["found_pred"], per["ORG"]["precision"]) == (0, 2, 0.0)
    assert (per["MISC"]["found_gold"], per["MISC"]["recall"], per["MISC"]["f1"]) == (0, 0.0, 0.0)


def test_entity_scores_nothing_found():
    scores = M.entity_scores([["O", "O"]], [["O", "B-PER"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)


# conlleval.pl's endOfChunk / startOfChunk as their lists of (previous, current) prefix pairs,
# with the S- pairs of conlleval's BIOES extension, and the type rule.
END_PAIRS = {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O"),
             ("B", "S"), ("I", "S"), ("E", "S"), ("E", "B"),
             ("S", "E"), ("S", "I"), ("S", "O"), ("S", "S"), ("S", "B")}
START_PAIRS = {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E"),
               ("S", "B"), ("E", "B"), ("B", "S"), ("I", "S"), ("O", "S"), ("S", "S"), ("E", "S"),
               ("S", "I"), ("S", "E")}


def reference_end(prev, tag, prev_type, kind):
    return (prev, tag) in END_PAIRS or (prev != "O" and prev_type != kind)


def reference_start(prev, tag, prev_type, kind):
    return (prev, tag) in START_PAIRS or (tag != "O" and prev_type != kind)


def split(tag):
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def conlleval_counts(pred_sentences, gold_sentences):
    """conlleval.pl's main loop: 'gold pred' lines, a sentence break read as an O line; a chunk is
    correct when both open together with one type and both close together (its inCorrect flag)."""
    lines = []
    for pred, gold in zip(pred_sentences, gold_sentences):
        lines += list(zip(gold, pred)) + [("O", "O")]
    correct, found_gold, found_pred = collections.Counter(), collections.Counter(), collections.Counter()
    in_correct = False
    last_c, last_ct, last_g, last_gt = "O", "", "O", ""
    for gold_tag, pred_tag in lines:
        (c, ct), (g, gt) = split(gold_tag), split(pred_tag)
        if in_correct:
            c_end, g_end = reference_end(last_c, c, last_ct, ct), reference_end(last_g, g, last_gt, gt)
            if c_end and g_end and last_gt == last_ct:
                in_correct = False
                correct[last_ct] += 1
            elif c_end != g_end or gt != ct:
                in_correct = False
        c_start, g_start = reference_start(last_c, c, last_ct, ct), reference_start(last_g, g, last_gt, gt)
        if c_start and g_start and gt == ct:
            in_correct = True
        if c_start:
            found_gold[ct] += 1
        if g_start:
            found_pred[gt] += 1
        last_c, last_ct, last_g, last_gt = c, ct, g, gt
    if in_correct:
        correct[last_ct] += 1
    return correct, found_gold, found_pred


@pytest.mark.parametrize("scheme, letters", [("iob2", "BIO"), ("iob1", "BIO"), ("bioes", "BIOES")])
@pytest.mark.parametrize("seed", SEEDS)
def test_entity_scores_against_conlleval_loop(seed, scheme, letters):
    rng = np.random.default_rng(seed)

    def random_tag():
        letter = letters[rng.integers(len(letters))]
        return "O" if letter == "O" else f"{letter}-{['PER', 'LOC', 'ORG-X'][rng.integers(3)]}"

    for _ in range(20):
        lengths = rng.integers(0, 12, size=int(rng.integers(1, 6)))
        gold = [[random_tag() for _ in range(n)] for n in lengths]
        # predictions: the gold tags with some replaced, so that many chunks agree
        pred = [[random_tag() if rng.random() < 0.3 else tag for tag in sentence] for sentence in gold]
        correct, found_gold, found_pred = conlleval_counts(pred, gold)
        scores = M.entity_scores(pred, gold, scheme=scheme)
        assert (scores["correct"], scores["found_gold"], scores["found_pred"]) == (
            sum(correct.values()), sum(found_gold.values()), sum(found_pred.values())), (pred, gold)
        for kind, per in scores["per_type"].items():
            assert (per["correct"], per["found_gold"], per["found_pred"]) == (
                correct[kind], found_gold[kind], found_pred[kind]), (kind, pred, gold)
        assert set(scores["per_type"]) == set(found_gold) | set(found_pred)


# ---------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("The Quick, Brown fox!", "quick brown fox"),
    ("  a  cat\tAN apple\n", "cat apple"),
    ("theater and anthem", "theater and anthem"),     # articles only as whole words
    ("U.S. Army's", "us armys"),
    ("the.cat", "thecat"),                             # punctuation goes first, so no article here
    ("the-end", "theend"),
    ("The", ""),
    ("", ""),
    ("Élan, CAFÉ", "élan café"),                      # only ASCII punctuation is removed
])
def test_normalize_answer(raw, normalised):
    assert M.normalize_answer(raw) == normalised


def test_exact_match_and_f1_by_hand():
    assert M.exact_match("the Eiffel Tower", ["Eiffel Tower", "tower"]) == 1.0
    assert M.exact_match("Eiffel", ["Eiffel Tower", "tower"]) == 0.0
    # pred [big, red, dog]; vs [red, dog]: p 2/3, r 1 -> 0.8; vs [big, dog, barked]: p = r = 2/3
    assert M.f1("the big red dog", ["red dog", "a big dog barked"]) == pytest.approx(0.8, abs=TOL)
    assert M.f1("a big dog barked", ["the big red dog"]) == pytest.approx(2 / 3, abs=TOL)
    # bag of tokens: one "dog" in common; p 1/3, r 1 -> 0.5
    assert M.f1("dog dog dog", ["dog"]) == pytest.approx(0.5, abs=TOL)
    assert M.f1("cat", ["dog"]) == 0.0


def test_unanswerable_questions():
    # v2: no gold answer (or only ones normalising to nothing): only the empty answer is right
    assert M.exact_match("", []) == M.f1("", []) == 1.0
    assert M.exact_match("London", []) == M.f1("London", []) == 0.0
    assert M.exact_match("an", ["the"]) == M.f1("an", ["the"]) == 1.0
    # a gold answer normalising to nothing is dropped when another is left (evaluate-v2.0.py)
    assert M.exact_match("", ["the", "Paris"]) == M.f1("", ["the", "Paris"]) == 0.0
    # an answerable question answered "no answer"
    assert M.exact_match("", ["Paris"]) == M.f1("", ["Paris"]) == 0.0


def test_squad_inputs_validated():
    with pytest.raises(ValueError, match="list of strings"):
        M.f1("x", "Paris")
    with pytest.raises(ValueError, match="prediction must be a string"):
        M.exact_match(None, ["Paris"])
    examples = [{"id": "q1", "answers": ["a b"]}, {"id": "q2", "answers": []}]
    with pytest.raises(ValueError, match=r"no prediction for 1 of 2 questions, e.g. \['q2'\]"):
        M.squad_scores({"q1": "a b"}, examples)
    with pytest.raises(ValueError, match="no na_prob for 1 of 2"):
        M.squad_scores({"q1": "a b", "q2": ""}, examples, na_probs={"q1": 0.5})
    with pytest.raises(ValueError, match="'q1' appears twice"):
        M.squad_scores({"q1": "a b"}, examples[:1] * 2)
    with pytest.raises(ValueError, match="dataset_examples is empty"):
        M.squad_scores({}, [])
    with pytest.raises(ValueError, match="answers must be"):
        M.squad_scores({"q1": "x"}, [{"id": "q1", "answers": [1]}])


def test_squad_scores_answer_formats_and_v1_keys():
    examples = [{"id": "a", "answers": ["Denver Broncos"]},                                   # plain
                {"id": "b", "answers": [{"text": "Santa Clara", "answer_start": 3}, {"text": "Levi's Stadium"}]},
                {"id": "c", "answers": {"text": ["gold", "golden"], "answer_start": [1, 1]}}]  # HF datasets
    predictions = {"a": "the Denver Broncos", "b": "Stadium", "c": "silver", "extra": "ignored"}
    scores = M.squad_scores(predictions, examples)
    # EM 1, 0, 0; F1 1, vs [levis, stadium]: p 1, r 1/2 -> 2/3, 0
    assert scores["exact"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["total"] == 3
    assert set(scores) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}


def test_has_answer_is_decided_before_normalisation():
    # official: bool(qa["answers"]); a gold "The" makes it answerable though only "" scores on it
    scores = M.squad_scores({"q": ""}, [{"id": "q", "answers": ["The"]}])
    assert (scores["HasAns_total"], scores["HasAns_exact"], scores["HasAns_f1"]) == (1, 100.0, 100.0)
    assert "NoAns_total" not in scores


def squad_v2_case():
    # raw EM / F1 per question, and the no-answer probability:
    #   q1 has answer, right          EM 1, F1 1            na 0.1
    #   q2 has answer, half of it     EM 0, F1 2/3 (p 1, r 1/2)   na 0.6
    #   q3 no answer, answered        EM 0, F1 0            na 0.8
    #   q4 no answer, "" given        EM 1, F1 1            na 0.3
    examples = [{"id": "q1", "answers": ["Paris"]}, {"id": "q2", "answers": ["John Smith"]},
                {"id": "q3", "answers": []}, {"id": "q4", "answers": []}]
    predictions = {"q1": "Paris", "q2": "John", "q3": "London", "q4": ""}
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.8, "q4": 0.3}
    return predictions, examples, na_probs


def test_squad_v2_splits_and_threshold():
    predictions, examples, na_probs = squad_v2_case()
    plain = M.squad_scores(predictions, examples)
    assert plain["exact"] == pytest.approx(50.0)                    # (1 + 0 + 0 + 1) / 4
    assert plain["f1"] == pytest.approx(100 * (8 / 3) / 4)           # (1 + 2/3 + 0 + 1) / 4
    assert (plain["HasAns_exact"], plain["HasAns_total"]) == (pytest.approx(50.0), 2)
    assert plain["HasAns_f1"] == pytest.approx(100 * (5 / 3) / 2)
    assert (plain["NoAns_exact"], plain["NoAns_f1"], plain["NoAns_total"]) == (50.0, 50.0, 2)
    assert "best_exact" not in plain

    # threshold 0.5: q2 and q3 (na 0.6, 0.8) count as "no answer": q2 -> 0, q3 -> 1
    scores = M.squad_scores(predictions, examples, na_probs=na_probs, na_prob_thresh=0.5)
    assert scores["exact"] == pytest.approx(75.0)                   # 1, 0, 1, 1
    assert scores["f1"] == pytest.approx(75.0)
    assert scores["HasAns_f1"] == pytest.approx(50.0)
    assert scores["NoAns_exact"] == pytest.approx(100.0)
    # "exceeds": at threshold 0.6 only q3 flips, q2 (na 0.6) keeps its raw F1 of 2/3
    at_q2 = M.squad_scores(predictions, examples, na_probs=na_probs, na_prob_thresh=0.6)
    assert at_q2["f1"] == pytest.approx(100 * (11 / 3) / 4)

    # best threshold: start with all unanswered: 2 (q3, q4); in na order q1 q4 q2 q3:
    #   EM: +1 (3, at 0.1), +0 (q4 gave ""), +0, -1 (q3 answered)     -> best 3/4 at 0.1
    #   F1: +1 (3, at 0.1), +0, +2/3 (11/3, at 0.6), -1                -> best (11/3)/4 at 0.6
    assert scores["best_exact"] == pytest.approx(75.0)
    assert scores["best_exact_thresh"] == 0.1
    assert scores["best_f1"] == pytest.approx(100 * (11 / 3) / 4)
    assert scores["best_f1_thresh"] == 0.6


def test_best_threshold_when_answering_nothing_is_best():
    # an unanswerable question answered (wrongly) at the lowest probability costs what the
    # answerable one gains: answering none is as good, and was reached first
    examples = [{"id": "x", "answers": []}, {"id": "y", "answers": ["b"]}]
    scores = M.squad_scores({"x": "a", "y": "b"}, examples, na_probs={"x": 0.2, "y": 0.9})
    # start 1 (x right when unanswered); x answered: 0; y answered rightly: 1, not > 1 -> 1/2 at 0.0
    assert (scores["best_exact"], scores["best_exact_thresh"]) == (50.0, 0.0)
    assert (scores["best_f1"], scores["best_f1_thresh"]) == (50.0, 0.0)
