"""pretrain.finetune.features with a real WordPiece trained by data_prep, checked against transformers'
BertTokenizerFast built from the same vocab.txt (classification pairs, words, SQuAD windows and offsets)
and against a brute-force span search (QA decoding)."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from data_prep.masking import IGNORE_INDEX
from data_prep.vocab import load_tokenizer_dir, read_tokenizer, save_tokenizer_dir, train_wordpiece
from pretrain.finetune.features import (collate, decode_squad, encode_classification, encode_squad, encode_tokens,
                                        truncate_longest_first, word_predictions)
from pretrain.finetune.tasks import (ClassificationExample, TaskDataError, TokenSentence, read_conll,
                                     read_squad)
from tests.data_prep.conftest import english_docs

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TAG_IDS = {t: i for i, t in enumerate(TAGS)}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return english_docs(100_000)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer_dir(train_wordpiece(lambda: iter(docs), 1000, lowercase=True), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer_dir(tokenizer_dir)[0]


@pytest.fixture(scope="module")
def reference(tokenizer_dir, tmp_path_factory):
    """transformers' BertTokenizerFast made from vocab.txt alone (not from our tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("ref")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return transformers.BertTokenizerFast.from_pretrained(str(out))


def corpus_sentences(docs, n: int, seed: int = 0) -> list[str]:
    sentences = [s.strip() for d in docs for s in d.split(". ") if s.strip()]
    return random.Random(seed).sample(sentences, n)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def test_classification_matches_transformers(tokenizer, reference, docs):
    texts = corpus_sentences(docs, 60) + ["", "a"]
    rng = random.Random(1)
    examples = [ClassificationExample(t, rng.choice(texts) if i % 3 else None, rng.choice(["neg", "pos"]), f"x:{i}")
                for i, t in enumerate(texts)]
    for max_length in (5, 8, 13, 32, 512):
        features = encode_classification(tokenizer, examples, max_length, {"neg": 0, "pos": 1})
        for ex, f in zip(examples, features):
            ref = reference(ex.text, ex.text_pair, truncation=True, max_length=max_length)
            assert (f.input_ids, f.token_type_ids) == (ref["input_ids"], ref["token_type_ids"]), (ex, max_length)
    assert [f.label for f in features] == [{"neg": 0, "pos": 1}[e.label] for e in examples]
    assert [f.example_index for f in features] == list(range(len(examples)))


def test_truncate_longest_first_rule():
    assert truncate_longest_first(3, 4, 10) == (3, 4)
    assert truncate_longest_first(2, 20, 10) == (2, 8)  # only the longer is cut
    assert truncate_longest_first(20, 7, 11) == (6, 5)  # both: the longer keeps the odd token
    assert truncate_longest_first(9, 9, 11) == (5, 6)  # a tie: B keeps it


def test_classification_labels_regression_and_collate(tokenizer):
    examples = [ClassificationExample("a short one", "and its pair", "3.8", "dev.tsv:2"),
                ClassificationExample("longer text here for the batch to pad", None, "0", "dev.tsv:3")]
    features = encode_classification(tokenizer, examples, 64, None)
    assert [f.label for f in features] == [3.8, 0.0]
    batch = collate(features, pad_id=0)
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"].dtype == torch.int64
    lengths = [len(f.input_ids) for f in features]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0]:].eq(0).all()
    assert collate(features, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    classes = encode_classification(tokenizer, examples[1:], 64, {"0": 0, "1": 1})
    assert collate(classes, 0)["labels"].dtype == torch.int64
    unlabeled = [ClassificationExample("x", None, None, "test.tsv:2")]
    assert "labels" not in collate(encode_classification(tokenizer, unlabeled, 16, {"0": 0}), 0)
    with pytest.raises(TaskDataError, match=r"^dev.tsv:2: label '3.8' is not in the label list \['0', '1'\]$"):
        encode_classification(tokenizer, examples, 64, {"0": 0, "1": 1})
    bad = [ClassificationExample("x", None, "high", "train.jsonl:7")]
    with pytest.raises(TaskDataError, match="^train.jsonl:7: label 'high' is not a finite number"):
        encode_classification(tokenizer, bad, 16, None)


def test_stored_truncation_and_padding_are_ignored(tokenizer, tokenizer_dir, tmp_path):
    # An HF model directory's tokenizer.json may carry truncation/padding settings: they must not
    # cut or pad features behind our back.
    stored = read_tokenizer(tokenizer_dir)
    stored.enable_truncation(6)
    stored.enable_padding(length=40)
    (tmp_path / "tokenizer.json").write_text(stored.to_str(), encoding="utf-8")
    loaded = read_tokenizer(tmp_path)
    examples = [ClassificationExample("the house of the people in the town was old", "yes it was", None, "x:1")]
    assert encode_classification(loaded, examples, 64, None) == encode_classification(tokenizer, examples, 64, None)
    assert loaded.truncation is not None  # the caller's tokenizer is left as it was


# ---------------------------------------------------------------------------------------------
# Token classification
# ---------------------------------------------------------------------------------------------

def tagged(words: list[str], seed: int) -> TokenSentence:
    rng = random.Random(seed)
    return TokenSentence(words, [rng.choice(TAGS) for _ in words], "train.txt", 1)


def first_subtoken_labels(word_ids, tags) -> list[int]:
    """HF run_ner's rule: the word's tag on its first sub-token, IGNORE_INDEX elsewhere."""
    return [IGNORE_INDEX if w is None or (i and word_ids[i - 1] == w) else TAG_IDS[tags[w]]
            for i, w in enumerate(word_ids)]


def test_tokens_match_transformers(tokenizer, reference, docs):
    sentences = [tagged(s.split(), i) for i, s in enumerate(corpus_sentences(docs, 40))]
    features = encode_tokens(tokenizer, sentences, 512, TAG_IDS)
    assert len(features) == len(sentences)
    for sentence, f in zip(sentences, features):
        ref = reference(sentence.tokens, is_split_into_words=True)
        assert f.input_ids == ref["input_ids"] and f.word_ids == ref.word_ids()
        assert f.labels == first_subtoken_labels(ref.word_ids(), sentence.tags)
        assert f.owned_words == (0, len(sentence.tokens)) and f.token_type_ids == [0] * len(f.input_ids)
    everywhere = encode_tokens(tokenizer, sentences, 512, TAG_IDS, label_all_subtokens=True)
    for sentence, f in zip(sentences, everywhere):
        for i, w in enumerate(f.word_ids):
            if w is None:
                assert f.labels[i] == IGNORE_INDEX
                continue
            tag = sentence.tags[w]
            if f.word_ids[i - 1] == w and tag.startswith("B-"):  # a continuation piece of a B- word
                tag = "I-" + tag[2:]
            assert f.labels[i] == TAG_IDS[tag]


def test_words_that_encode_to_nothing_become_unk(tokenizer):
    sentence = TokenSentence(["Peter", "\u200b", "went"], ["B-PER", "O", "O"], "t.txt", 1)
    (f,) = encode_tokens(tokenizer, [sentence], 32, TAG_IDS)
    unk = tokenizer.token_to_id("[UNK]")
    position = f.word_ids.index(1)
    assert f.input_ids[position] == unk and f.word_ids.count(1) == 1
    assert word_predictions([f], [f.labels]) == [[TAG_IDS["B-PER"], 0, 0]]


def test_long_sentences_are_windowed_and_every_word_predicted_once(tokenizer, docs):
    words = " ".join(docs[:40]).split()[:300]
    long_word = "abcdefghij" * 4  # many pieces: longer than a window at max_length 8
    sentences = [tagged(words, 1), tagged(words[:7], 2), tagged(words[:50] + [long_word] + words[50:80], 3),
                 TokenSentence([], [], "t.txt", 1)]
    (whole,) = encode_tokens(tokenizer, sentences[:1], 4096, TAG_IDS)
    for max_length, stride in ((24, None), (24, 5), (8, 1), (40, 38)):
        features = encode_tokens(tokenizer, sentences, max_length, TAG_IDS, stride=stride)
        assert all(len(f.input_ids) <= max_length for f in features)
        windows = [f for f in features if f.example_index == 0]
        assert len(windows) > 1
        for f in windows:  # each window is a run of whole words of the sentence
            first = whole.word_ids.index(f.word_ids[1])
            assert f.input_ids[1:-1] == whole.input_ids[first:first + len(f.input_ids) - 2]
            assert {w for w in f.word_ids if w is not None} >= set(range(*f.owned_words))
            for i, w in enumerate(f.word_ids):
                owned = w is not None and f.owned_words[0] <= w < f.owned_words[1]
                if not owned:
                    assert f.labels[i] == IGNORE_INDEX
        for index, sentence in enumerate(sentences):
            owned = [w for f in features if f.example_index == index for w in range(*f.owned_words)]
            assert owned == list(range(len(sentence.tokens)))
        # Logits that say the gold tag on a window's own words and a wrong one on its context words:
        # the gold tags come back, one per word.
        logits = []
        for f in features:
            tags = sentences[f.example_index].tags
            row = np.zeros((len(f.input_ids), len(TAGS)), dtype=np.float32)
            for i, w in enumerate(f.word_ids):
                if w is not None:
                    gold = TAG_IDS[tags[w]]
                    row[i, gold if f.owned_words[0] <= w < f.owned_words[1] else (gold + 1) % len(TAGS)] = 1
            logits.append(row)
        gold = [[TAG_IDS[t] for t in s.tags] for s in sentences]
        assert word_predictions(features, logits) == gold
        padded = torch.zeros(len(features), max_length, len(TAGS))
        for k, row in enumerate(logits):
            padded[k, :len(row)] = torch.from_numpy(row)
        assert word_predictions(features, padded) == gold
        assert word_predictions(features, padded.argmax(-1)) == gold
    with pytest.raises(ValueError, match="without a prediction"):
        word_predictions(features[1:], logits[1:])
    batch = collate(features, pad_id=0)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()


def test_unknown_tag_names_the_token_line(tokenizer, tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- O\n\nPeter B-PER\nwent O\n\nto O\nParis B-GPE\n", encoding="utf-8")
    sentences = read_conll(path)
    with pytest.raises(TaskDataError, match=rf"^{path}:7: tag 'B-GPE' is not in the label list \['O', "):
        encode_tokens(tokenizer, sentences, 32, TAG_IDS)
    untagged = encode_tokens(tokenizer, [TokenSentence(["to", "Paris"], None, "t.txt", 1)], 32, TAG_IDS)
    assert untagged[0].labels is None and "labels" not in collate(untagged, 0)


# ---------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------

def whole_word_answers(context: str, rng: random.Random, n: int) -> list[dict]:
    """Answers of 1-4 alphabetic whitespace words at spread-out places (first, last and between)."""
    words, position = [], 0
    for word in context.split(" "):
        words.append((position, word))
        position += len(word) + 1
    answers = []
    for k in range(n):
        target = (len(words) - 4) * k // max(n - 1, 1)
        span = next(words[i:i + rng.randint(1, 4)] for i in range(target, len(words)) if words[i][1].isalpha())
        span = span[:next((j for j, (_, w) in enumerate(span) if not w.isalpha()), len(span))]
        start, end = span[0][0], span[-1][0] + len(span[-1][1])
        answers.append({"text": context[start:end], "answer_start": start})
    return answers


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory, docs):
    """A v1.1 and a v2.0 file of long contexts (each many windows long), whole-word answers."""
    rng = random.Random(5)
    contexts = [" ".join(docs[i:i + 6]) for i in (4, 10, 20)] + ["Short context about Emma."]
    paragraphs_v1, paragraphs_v2 = [], []
    for c, context in enumerate(contexts):
        answers = whole_word_answers(context, rng, 6 if len(context) > 100 else 1)
        qas = [{"id": f"c{c}q{k}", "question": f"what is said of the words number {k} in this long paragraph of text?",
                "answers": [a]} for k, a in enumerate(answers)]
        paragraphs_v1.append({"context": context, "qas": qas})
        impossible = [{"id": f"c{c}x", "question": "who won?", "answers": [], "is_impossible": True}]
        paragraphs_v2.append({"context": context, "qas": [dict(q, is_impossible=False) for q in qas] + impossible})
    out = tmp_path_factory.mktemp("squad")
    (out / "v1.json").write_text(json.dumps({"version": "1.1", "data": [{"paragraphs": paragraphs_v1}]}))
    (out / "v2.json").write_text(json.dumps({"version": "v2.0", "data": [{"paragraphs": paragraphs_v2}]}))
    return out / "v1.json", out / "v2.json"


SQUAD_SETTINGS = dict(max_length=64, doc_stride=24, max_query_length=12)


def test_squad_windows_match_transformers_and_cover_the_context(tokenizer, reference, squad_files):
    examples = read_squad(squad_files[1])
    features = encode_squad(tokenizer, examples, **SQUAD_SETTINGS)
    for index, ex in enumerate(examples):
        windows = [f for f in features if f.example_index == index]
        context_offsets = [tuple(o) for o in tokenizer.encode(ex.context, add_special_tokens=False).offsets]
        covered = {o for f in windows for o in f.offsets if o is not None}
        assert covered == set(context_offsets)
        # Each context token is scored (max context) in exactly one window.
        scored = [o for f in windows for o, m in zip(f.offsets, f.token_is_max_context) if m]
        assert sorted(scored) == context_offsets
        query = len(tokenizer.encode(ex.question, add_special_tokens=False).ids)
        if query <= SQUAD_SETTINGS["max_query_length"]:
            room = SQUAD_SETTINGS["max_length"] - query - 3
            ref = reference(ex.question, ex.context, truncation="only_second", max_length=SQUAD_SETTINGS["max_length"],
                            stride=room - SQUAD_SETTINGS["doc_stride"], return_overflowing_tokens=True,
                            return_offsets_mapping=True)
            assert [f.input_ids for f in windows] == ref["input_ids"]
            assert [f.token_type_ids for f in windows] == ref["token_type_ids"]
            for f, offsets, types in zip(windows, ref["offset_mapping"], ref["token_type_ids"]):
                assert [o for o in f.offsets if o is not None] == [tuple(o) for o, t in zip(offsets, types) if t][:-1]
        else:  # the question is cut to max_query_length tokens
            assert all(f.token_type_ids.count(0) == SQUAD_SETTINGS["max_query_length"] + 2 for f in windows)
    assert sum(f.example_index == 0 for f in features) > 5  # long contexts: many windows


def test_squad_answer_positions(tokenizer, squad_files):
    examples = read_squad(squad_files[1])
    features = encode_squad(tokenizer, examples, **SQUAD_SETTINGS)
    found = set()
    for f in features:
        ex = examples[f.example_index]
        context = [o for o in f.offsets if o is not None]
        if ex.is_impossible:
            assert (f.start_position, f.end_position) == (0, 0)
            continue
        answer = ex.answers[0]
        inside = context[0][0] <= answer.start and answer.end <= context[-1][1]
        if not inside:
            assert (f.start_position, f.end_position) == (0, 0)
            continue
        assert 0 < f.start_position <= f.end_position
        assert ex.context[f.offsets[f.start_position][0]:f.offsets[f.end_position][1]] == answer.text
        found.add(f.example_index)
    assert found == {i for i, ex in enumerate(examples) if not ex.is_impossible}
    batch = collate(features[:5], pad_id=0)
    assert batch["start_positions"].tolist() == [f.start_position for f in features[:5]]
    assert batch["end_positions"].tolist() == [f.end_position for f in features[:5]]


def gold_logits(features, examples, rng: np.random.Generator, null_boost: bool):
    """Noise, plus +10 at the gold start and end (or at [CLS] for unanswerable questions)."""
    starts, ends = [], []
    for f in features:
        s, e = rng.normal(size=len(f.input_ids)), rng.normal(size=len(f.input_ids))
        if f.start_position > 0:
            s[f.start_position] += 10
            e[f.end_position] += 10
        elif null_boost and examples[f.example_index].is_impossible:
            s[0] += 10
            e[0] += 10
        starts.append(s)
        ends.append(e)
    return starts, ends


def test_decode_returns_the_gold_spans(tokenizer, squad_files):
    rng = np.random.default_rng(0)
    examples = read_squad(squad_files[0])
    features = encode_squad(tokenizer, examples, **SQUAD_SETTINGS)
    starts, ends = gold_logits(features, examples, rng, null_boost=False)
    predictions = decode_squad(examples, features, starts, ends)
    assert predictions.answers == {ex.id: ex.answers[0].text for ex in examples}
    assert predictions.null_score_diff == {}
    # Padded batch rows with large logits on the padding: the padding is never chosen.
    width = max(len(f.input_ids) for f in features) + 3
    padded_starts = torch.full((len(features), width), 50.0)
    padded_ends = torch.full((len(features), width), 50.0)
    for k, (s, e) in enumerate(zip(starts, ends)):
        padded_starts[k, :len(s)] = torch.from_numpy(s)
        padded_ends[k, :len(e)] = torch.from_numpy(e)
    assert decode_squad(examples, features, padded_starts, padded_ends).answers == predictions.answers


def test_decode_v2_null_answers(tokenizer, squad_files):
    rng = np.random.default_rng(1)
    examples = read_squad(squad_files[1])
    features = encode_squad(tokenizer, examples, **SQUAD_SETTINGS)
    starts, ends = gold_logits(features, examples, rng, null_boost=True)
    predictions = decode_squad(examples, features, starts, ends, version_2=True)
    for ex in examples:
        diff = predictions.null_score_diff[ex.id]
        if ex.is_impossible:
            assert predictions.answers[ex.id] == "" and diff > 0
        else:
            assert predictions.answers[ex.id] == ex.answers[0].text and diff < 0
        assert "" in [entry["text"] for entry in predictions.n_best[ex.id]]
    # The threshold moves the decision: above every difference, nothing is predicted empty.
    high = max(predictions.null_score_diff.values()) + 1
    relaxed = decode_squad(examples, features, starts, ends, version_2=True, null_score_diff_threshold=high)
    assert all(relaxed.answers.values())


def brute_force(example, features, starts, ends, max_answer_length) -> str:
    best, text = -np.inf, ""
    for f, s, e in zip(features, starts, ends):
        for i in range(len(f.input_ids)):
            if f.offsets[i] is None or not f.token_is_max_context[i]:
                continue
            for j in range(i, min(i + max_answer_length, len(f.input_ids))):
                if f.offsets[j] is not None and s[i] + e[j] > best:
                    best, text = s[i] + e[j], example.context[f.offsets[i][0]:f.offsets[j][1]]
    return text


def test_decode_matches_brute_force_max_answer_length_and_n_best(tokenizer, squad_files):
    rng = np.random.default_rng(2)
    examples = read_squad(squad_files[0])
    features = encode_squad(tokenizer, examples, **SQUAD_SETTINGS)
    starts = [rng.normal(size=len(f.input_ids)) for f in features]
    ends = [rng.normal(size=len(f.input_ids)) for f in features]
    for max_answer_length in (1, 3, 30):
        predictions = decode_squad(examples, features, starts, ends, n_best=1000, max_answer_length=max_answer_length)
        for index, ex in enumerate(examples):
            mine = [k for k, f in enumerate(features) if f.example_index == index]
            expected = brute_force(ex, [features[k] for k in mine], [starts[k] for k in mine],
                                   [ends[k] for k in mine], max_answer_length)
            assert predictions.answers[ex.id] == expected
    predictions = decode_squad(examples, features, starts, ends, n_best=3)
    for id_, entries in predictions.n_best.items():
        if not entries:  # the top 3 starts and ends made no valid span
            assert predictions.answers[id_] == ""
            continue
        scores = [x["start_logit"] + x["end_logit"] for x in entries]
        assert len(entries) <= 3 and scores == sorted(scores, reverse=True)
        assert len({x["text"] for x in entries}) == len(entries)
        assert sum(x["probability"] for x in entries) == pytest.approx(1.0)
    assert sum(len(entries) == 3 for entries in predictions.n_best.values()) > len(examples) // 2
    # A 6-token span with the peak logits is taken only when max_answer_length allows 6 tokens.
    f = next(f for f in features if f.example_index == 0)
    start = f.token_type_ids.index(1) + 2
    s, e = np.zeros(len(f.input_ids)), np.zeros(len(f.input_ids))
    s[start], e[start + 5] = 10, 10
    span = examples[0].context[f.offsets[start][0]:f.offsets[start + 5][1]]
    assert decode_squad(examples[:1], [f], [s], [e], max_answer_length=6).answers["c0q0"] == span
    assert decode_squad(examples[:1], [f], [s], [e], max_answer_length=5).answers["c0q0"] != span
