"""pretrain.finetune.tasks: the task-file readers on small files, and their one-line errors."""
from __future__ import annotations

import json

import pytest

from pretrain.finetune.tasks import (GLUE_COLUMNS, TaskDataError, infer_task, label_list, read_classification,
                                     read_conll, read_squad)


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(TaskDataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Classification files
# ---------------------------------------------------------------------------------------------

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def mnli_row(i: int, a: str, b: str, label: str) -> str:
    return f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{label}\t{label}\n"


def test_tsv_with_header_glue_mnli(tmp_path):
    # GLUE texts hold unbalanced quotes: QUOTE_NONE keeps them as written.
    path = write(tmp_path / "dev_matched.tsv", MNLI_HEADER + mnli_row(0, 'He said "yes', "No one spoke.", "neutral")
                 + mnli_row(1, "It's \"fine\".", '"Quoted" start', "entailment")
                 + mnli_row(2, "A", "B", "contradiction"))
    examples = read_classification(path, **GLUE_COLUMNS["mnli"])
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ('He said "yes', "No one spoke.", "neutral"), ('It\'s "fine".', '"Quoted" start', "entailment"),
        ("A", "B", "contradiction")]
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (2, 3, 4)]
    # The same columns by index (MNLI's gold label is the last one).
    by_index = read_classification(path, text_column=8, text_pair_column=9, label_column=-1)
    assert by_index == examples
    assert label_list(e.label for e in examples) == ["contradiction", "entailment", "neutral"]
    assert infer_task(e.label for e in examples) == "classification"


def test_tsv_without_header_glue_cola(tmp_path):
    path = write(tmp_path / "train.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\n"
                 "gj04\t0\t*\tThey drank the pub.\n\n")
    examples = read_classification(path, **GLUE_COLUMNS["cola"])
    assert [(e.text, e.text_pair, e.label, e.source) for e in examples] == [
        ("Our friends won't buy this analysis.", None, "1", f"{path}:1"),
        ("They drank the pub.", None, "0", f"{path}:2")]
    assert "by name" in error_of(read_classification, path, text_column="sentence", header=False)


def test_glue_stsb_is_regression_and_test_files_are_unlabeled(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = ["0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
            "An air plane is taking off.\t5.000\n",
            "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\t"
            "A man plays a big flute.\t3.800\n"]
    examples = read_classification(write(tmp_path / "dev.tsv", header + "".join(rows)), **GLUE_COLUMNS["stsb"])
    assert [e.label for e in examples] == ["5.000", "3.800"]
    assert infer_task(e.label for e in examples) == "regression"
    test = read_classification(write(tmp_path / "test.tsv", "index\tsentence\n0\tA great film.\n"),
                               text_column="sentence", label_column=None)
    assert [(e.text, e.label) for e in test] == [("A great film.", None)]


def test_csv_with_quotes(tmp_path):
    path = write(tmp_path / "train.csv", 'label,text,text_pair\r\n'
                 'pos,"Good, really good","He said ""wow"""\r\n'
                 'neg,"two\nlines",plain\r\n'
                 'neg,last,""\r\n')
    examples = read_classification(path, text_pair_column="text_pair")
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ("Good, really good", 'He said "wow"', "pos"), ("two\nlines", "plain", "neg"), ("last", "", "neg")]
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["2", "3", "5"]  # a row's first line
    bad = write(tmp_path / "bad.csv", 'label,text\npos,"fine"\nneg,"open"quote\n')
    assert error_of(read_classification, bad).startswith(f"{bad}:3: ")


def test_jsonl(tmp_path):
    lines = [{"text": "a b", "label": 1}, {"text": "c", "text_pair": "d", "label": "pos"}, {"text": "e", "label": True},
             {"text": "f", "label": 0.25}]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
                 + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    examples = read_classification(path)
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ("a b", None, "1"), ("c", None, "pos"), ("e", None, "true"), ("f", None, "0.25")]
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (1, 2, 4, 5)]
    pairs = read_classification(write(tmp_path / "pairs.json", json.dumps(lines[1]) + "\n"),
                                text_pair_column="text_pair")
    assert pairs[0].text_pair == "d"


def test_label_list_and_infer_task():
    assert label_list(["10", "2", None, "1", "2"]) == ["1", "2", "10"]
    assert label_list(["b", "a", "B-PER", "O"]) == ["B-PER", "O", "a", "b"]
    assert infer_task(["0", "1", "1"]) == "classification"  # integers are class names
    assert infer_task(["0.5", "1", None]) == "regression"
    assert infer_task(["1.5", "pos"]) == "classification"
    assert infer_task(["nan", "1.5"]) == "classification"
    with pytest.raises(TaskDataError):
        infer_task([None])


def test_classification_errors_name_the_place(tmp_path):
    tsv = write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\ntoo\tmany\tcolumns\n")
    assert error_of(read_classification, tsv, text_column="sentence") == \
        f"{tsv}:3: 3 columns, expected 2 (as the header)"
    assert f"{tsv}:1: no column 'text'" in error_of(read_classification, tsv)
    assert "out of range" in error_of(read_classification, tsv, text_column=5)
    empty = write(tmp_path / "empty_label.tsv", "sentence\tlabel\nok\t \n")
    assert error_of(read_classification, empty, text_column="sentence").startswith(f"{empty}:2: empty label")
    jsonl = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1\n')
    assert error_of(read_classification, jsonl).startswith(f"{jsonl}:2: not valid JSON")
    missing = write(tmp_path / "missing.jsonl", '{"text": "a", "label": 1}\n{"sentence": "b", "label": 1}\n')
    assert error_of(read_classification, missing) == f"{missing}:2: key 'text': no such key; expected a string"
    nolabel = write(tmp_path / "nolabel.jsonl", '{"text": "a"}\n')
    assert error_of(read_classification, nolabel).startswith(f"{nolabel}:1: label key 'label': no such key")
    utf = write(tmp_path / "latin1.tsv", "text\tlabel\nok\t1\ncaf\u00e9\t0\n", encoding="latin-1")
    assert error_of(read_classification, utf).startswith(f"{utf}:3: invalid UTF-8")
    assert "cannot tell the format" in error_of(read_classification, write(tmp_path / "x.txt", "a\n"))
    assert "cannot read" in error_of(read_classification, tmp_path / "absent.tsv")


# ---------------------------------------------------------------------------------------------
# CoNLL
# ---------------------------------------------------------------------------------------------

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
"""


def test_conll_sentences_docstart_and_blank_lines(tmp_path):
    path = write(tmp_path / "train.txt", CONLL.replace("\n", "\r\n"))
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                             ["BRUSSELS"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [s.line for s in sentences] == [3, 9, 15]
    assert sentences[0].where(2) == f"{path}:5"
    chunks = read_conll(path, tag_column=2)
    assert chunks[1].tags == ["B-NP", "I-NP"]
    untagged = read_conll(write(tmp_path / "test.txt", "EU\nrejects\n\nPeter\n"), tag_column=None)
    assert [(s.tokens, s.tags) for s in untagged] == [(["EU", "rejects"], None), (["Peter"], None)]
    tabbed = read_conll(write(tmp_path / "wnut.tsv", "New York\tB-LOC\nis\tO\n"), delimiter="\t")
    assert tabbed[0].tokens == ["New York", "is"]


def test_conll_errors(tmp_path):
    ragged = write(tmp_path / "ragged.txt", "EU NNP B-ORG\nrejects O\n")
    assert error_of(read_conll, ragged).startswith(f"{ragged}:2: 2 columns, expected 3")
    one = write(tmp_path / "one.txt", "\nEU\nrejects\n")
    assert error_of(read_conll, one).startswith(f"{one}:2: the line has 1 column(s) and tag_column=-1 is the token")
    assert "out of range" in error_of(read_conll, ragged, tag_column=5)


# ---------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France.")


def squad(qas: list[dict], version: str = "1.1", context: str = CONTEXT) -> dict:
    return {"version": version, "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_squad_v1_and_v2(tmp_path):
    start = CONTEXT.index("Normandy")
    answers = [{"text": "Normandy", "answer_start": start}, {"text": "Normandy, a region", "answer_start": start}]
    v1 = squad([{"id": "q1", "question": "What name?", "answers": answers}])
    examples = read_squad(write(tmp_path / "dev-v1.1.json", json.dumps(v1)))
    (ex,) = examples
    assert (ex.id, ex.question, ex.context, ex.is_impossible) == ("q1", "What name?", CONTEXT, False)
    assert [(a.text, a.start, a.end) for a in ex.answers] == [("Normandy", start, start + 8),
                                                              ("Normandy, a region", start, start + 18)]
    france = [{"text": "France", "answer_start": CONTEXT.index("France")}]
    v2 = squad([{"id": "q1", "question": "Where?", "answers": france, "is_impossible": False},
                {"id": "q2", "question": "Who conquered Mars?", "answers": [], "is_impossible": True,
                 "plausible_answers": [{"text": "The Normans", "answer_start": 0}]}], version="v2.0")
    examples = read_squad(write(tmp_path / "train-v2.0.json", json.dumps(v2)))
    assert [(e.id, e.is_impossible, [a.text for a in e.answers]) for e in examples] == [
        ("q1", False, ["France"]), ("q2", True, [])]
    assert examples[1].source.endswith("data[0].paragraphs[0].qas[1] (id q2)")


def test_squad_errors(tmp_path):
    def check(data, expected: str, name="bad.json"):
        path = write(tmp_path / name, data if isinstance(data, str) else json.dumps(data))
        message = error_of(read_squad, path)
        assert message.startswith(f"{path}") and expected in message, message

    check(squad([{"id": "q7", "question": "?", "answers": [{"text": "Normandy", "answer_start": 4}]}]),
          "data[0].paragraphs[0].qas[0] (id q7).answers[0]: answer_start 4 does not match the context: "
          "expected 'Normandy' there, found 'Normans '")
    check(squad([{"id": "q1", "question": "?", "answers": []}, {"id": "q1", "question": "?", "answers": []}]),
          "qas[1] (id q1): id 'q1' repeats")
    check(squad([{"id": "q2", "question": "?", "answers": [{"text": "The", "answer_start": 0}],
                  "is_impossible": True}], version="v2.0"), "(id q2): is_impossible is true but it has 1 answer(s)")
    check({"data": [{"paragraphs": [{"qas": []}]}]}, "data[0].paragraphs[0]: 'context' is missing; expected a string")
    no_start = [{"id": "q3", "question": "?", "answers": [{"text": "x"}]}]
    check({"data": [{"paragraphs": [{"context": "x", "qas": no_start}]}]},
          "(id q3).answers[0]: 'answer_start' is missing")
    check({"version": "1.1"}, "no 'data' list")
    check('{"data": [\n  {"paragraphs": ]}', "bad.json:2: not valid JSON")
