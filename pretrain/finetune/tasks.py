"""Downstream task files, read from local paths into examples (nothing is downloaded).

Three task families, three readers; every example remembers where it came from, so that a bad
row, tag or answer found later (by :mod:`pretrain.finetune.features`) is reported at its place.

* **Sequence classification and regression** (:func:`read_classification`): one example per row,
  a text, an optional second text (pairs: MNLI, QQP, STS-B, ...) and a label.

  - ``tsv``: tab-separated, read with ``csv.QUOTE_NONE`` by default, as GLUE's own files must be
    (their texts hold unbalanced quotes).  With ``header=True`` the first row names the columns.
  - ``csv``: comma-separated with standard quoting (``"a, b"``, ``""`` for a quote, fields may
    span lines).
  - ``jsonl`` (also ``.json``): one JSON object per line; columns are keys.

  Columns are given by header name or by integer index (negative counts from the end), e.g.
  ``text_column="sentence1"`` or ``text_column=8``.  :data:`GLUE_COLUMNS` holds the settings of
  GLUE's train/dev TSVs (test files have no label: pass ``label_column=None``).  Every row must
  have as many columns as the header (or, without one, as the first row).  Labels stay strings;
  :func:`infer_task` says whether they are class names or regression targets and
  :func:`label_list` orders the class names.

* **Token classification** (:func:`read_conll`): CoNLL-style files, one token a line with
  whitespace-separated columns (token first, tag last by default; CoNLL-2003 is
  ``word POS chunk NER``), sentences separated by blank lines, ``-DOCSTART-`` lines separating
  documents.  Tags are kept as written (BIO/IOB2, BIOES, or any tag set: POS, chunks).

* **Extractive question answering** (:func:`read_squad`): SQuAD v1.1 and v2.0 JSON,
  ``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers":
  [{"text", "answer_start"}], "is_impossible"}]}]}]}``.  v2.0 marks unanswerable questions with
  ``is_impossible: true`` and no answers.  Every answer must be found at its ``answer_start``.

Bad input raises :class:`TaskDataError`, one line naming the file, the line (or the JSON path
and question id) and what was expected.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

Column = Union[str, int]
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_INTEGER = re.compile(r"[+-]?\d+")


class TaskDataError(ValueError):
    """Bad task data, for the user in one line: file, place (line, JSON path, id) and what was expected."""


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    text_pair: Optional[str]
    label: Optional[str]  # as written in the file; None in unlabeled (test) files
    source: str  # "path:line" of the row


@dataclass(frozen=True)
class TokenSentence:
    tokens: list[str]
    tags: Optional[list[str]]  # one per token; None for untagged files
    path: str
    line: int  # line of the first token; token i is on line ``line + i``

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line + i}"


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: list[Answer]  # training uses the first; empty when unanswerable or unlabeled
    is_impossible: bool  # SQuAD v2.0's unanswerable questions
    source: str  # "path: data[i].paragraphs[j].qas[k] (id ...)"


# GLUE's train/dev TSV layouts (header names where the file has a header; CoLA's has none).
GLUE_COLUMNS: dict[str, dict] = {
    "cola": dict(text_column=3, label_column=1, header=False),  # source, label, original mark, sentence
    "sst2": dict(text_column="sentence", label_column="label"),
    "mrpc": dict(text_column="#1 String", text_pair_column="#2 String", label_column="Quality"),
    "qqp": dict(text_column="question1", text_pair_column="question2", label_column="is_duplicate"),
    "stsb": dict(text_column="sentence1", text_pair_column="sentence2", label_column="score"),
    "mnli": dict(text_column="sentence1", text_pair_column="sentence2", label_column="gold_label"),
    "qnli": dict(text_column="question", text_pair_column="sentence", label_column="label"),
    "rte": dict(text_column="sentence1", text_pair_column="sentence2", label_column="label"),
    "wnli": dict(text_column="sentence1", text_pair_column="sentence2", label_column="label"),
}


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, a BOM dropped); errors name the line of a bad byte."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TaskDataError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: invalid UTF-8; expected a UTF-8 text file") from None


# ---------------------------------------------------------------------------------------------
# Classification and regression
# ---------------------------------------------------------------------------------------------

def read_classification(path, *, format: Optional[str] = None, text_column: Column = "text",
                        text_pair_column: Optional[Column] = None, label_column: Optional[Column] = "label",
                        header: bool = True, quoting: Optional[int] = None) -> list[ClassificationExample]:
    """Examples of a TSV, CSV or JSONL file (see the module doc).

    ``format``: ``tsv``, ``csv`` or ``jsonl``; None infers it from the suffix.  ``label_column=None``
    reads an unlabeled file.  ``header`` and ``quoting`` (a ``csv.QUOTE_*`` constant; None: NONE for
    TSV, MINIMAL for CSV) apply to TSV and CSV only."""
    path = Path(path)
    if format is None:
        format = FORMATS.get(path.suffix.lower())
        if format is None:
            raise TaskDataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                                f"expected one of {sorted(FORMATS)} or an explicit format (tsv, csv, jsonl)")
    if format == "jsonl":
        return _read_jsonl(path, text_column, text_pair_column, label_column)
    if format not in ("tsv", "csv"):
        raise TaskDataError(f"{path}: unknown format {format!r}; expected tsv, csv or jsonl")
    if quoting is None:
        quoting = csv.QUOTE_NONE if format == "tsv" else csv.QUOTE_MINIMAL
    delimiter = "\t" if format == "tsv" else ","
    rows = _delimited_rows(path, delimiter, quoting)
    columns = (text_column, text_pair_column, label_column)
    examples = []
    first = next(rows, None)
    if first is None:
        return examples
    line, row = first
    width = len(row)
    text_i, pair_i, label_i = (_column_index(path, c, row if header else None, width) for c in columns)
    if not header:
        examples.append(_row_example(path, line, row, text_i, pair_i, label_i))
    for line, row in rows:
        if len(row) != width:
            raise TaskDataError(f"{path}:{line}: {len(row)} columns, expected {width} "
                                f"(as {'the header' if header else 'the first row'})")
        examples.append(_row_example(path, line, row, text_i, pair_i, label_i))
    return examples


def _delimited_rows(path: Path, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields) of each non-blank row."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)
    line = 1
    try:
        for row in reader:
            if row:
                yield line, row
            line = reader.line_num + 1
    except csv.Error as err:
        kind = "tab" if delimiter == "\t" else "comma"
        raise TaskDataError(f"{path}:{reader.line_num}: {err}; expected {kind}-separated fields") from None


def _column_index(path: Path, column: Optional[Column], header_row: Optional[list[str]], width: int):
    """Index of a column given by name (needs a header) or by index (checked against the width)."""
    if column is None:
        return None
    if isinstance(column, str):
        if header_row is None:
            raise TaskDataError(f"{path}: column {column!r} is given by name but the file is read without a "
                                "header; give its index (0-based) or header=True")
        if column not in header_row:
            raise TaskDataError(f"{path}:1: no column {column!r} in the header; columns: {header_row}")
        return header_row.index(column)
    if not -width <= column < width:
        raise TaskDataError(f"{path}:1: column index {column} is out of range: the file has {width} columns")
    return column % width


def _row_example(path, line, row, text_i, pair_i, label_i) -> ClassificationExample:
    label = None if label_i is None else row[label_i].strip()
    if label == "":
        raise TaskDataError(f"{path}:{line}: empty label in column {label_i}; expected a label "
                            "(label_column=None reads an unlabeled file)")
    return ClassificationExample(row[text_i], None if pair_i is None else row[pair_i], label, f"{path}:{line}")


def _read_jsonl(path: Path, text_key, pair_key, label_key) -> list[ClassificationExample]:
    for key in (text_key, pair_key, label_key):
        if key is not None and not isinstance(key, str):
            raise TaskDataError(f"{path}: column {key!r} must be a key name in a JSON lines file")
    examples = []
    for line, raw in enumerate(_read_text(path).split("\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one "
                                "JSON object per line") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{where}: a JSON {type(record).__name__}; expected one JSON object per line")
        text = _json_text(record, text_key, where)
        pair = None if pair_key is None else _json_text(record, pair_key, where)
        examples.append(ClassificationExample(text, pair, _json_label(record, label_key, where), where))
    return examples


def _json_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "no such key" if key not in record else f"a JSON {type(value).__name__}"
        raise TaskDataError(f"{where}: key {key!r}: {found}; expected a string")
    return value


def _json_label(record: dict, key: Optional[str], where: str) -> Optional[str]:
    if key is None:
        return None
    value = record.get(key)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    found = "no such key" if key not in record else f"{value!r}"
    raise TaskDataError(f"{where}: label key {key!r}: {found}; expected a string or a number "
                        "(label_column=None reads an unlabeled file)")


def label_list(labels: Iterable[Optional[str]]) -> list[str]:
    """The distinct labels (None skipped), in a fixed order: numerically when all are integers
    ("2" before "10"), else sorted as strings.  Pass the labels of every split, so ids agree."""
    distinct = {label for label in labels if label is not None}
    if distinct and all(_INTEGER.fullmatch(label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))
    return sorted(distinct)


def infer_task(labels: Iterable[Optional[str]]) -> str:
    """``"regression"`` when every label is a finite number and not all are integers (STS-B's "3.800"),
    else ``"classification"`` (integer labels are class names: "0"/"1").  None labels are skipped."""
    values = [label for label in labels if label is not None]
    if not values:
        raise TaskDataError("no labels to infer the task from (every example is unlabeled)")
    if all(_INTEGER.fullmatch(v.strip()) for v in values):
        return "classification"
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return "classification"
    return "regression" if all(math.isfinite(x) for x in numbers) else "classification"


# ---------------------------------------------------------------------------------------------
# Token classification
# ---------------------------------------------------------------------------------------------

def read_conll(path, token_column: int = 0, tag_column: Optional[int] = -1,
               delimiter: Optional[str] = None) -> list[TokenSentence]:
    """Sentences of a CoNLL-style file (see the module doc).  ``delimiter`` None splits columns on
    any whitespace; ``tag_column=None`` reads an untagged file.  Every token line must have as
    many columns as the first."""
    path = Path(path)
    sentences: list[TokenSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = width = 0

    def flush():
        if tokens:
            sentences.append(TokenSentence(list(tokens), None if tag_column is None else list(tags), str(path),
                                           start))
            tokens.clear()
            tags.clear()

    for line, raw in enumerate(_read_text(path).split("\n"), 1):
        cols = raw.rstrip("\r").split(delimiter)
        if not raw.strip() or cols[0] == "-DOCSTART-":
            flush()
            continue
        if not width:
            width = len(cols)
            _check_conll_columns(path, line, width, token_column, tag_column)
        elif len(cols) != width:
            raise TaskDataError(f"{path}:{line}: {len(cols)} columns, expected {width} "
                                "(as the file's first token line)")
        if not tokens:
            start = line
        tokens.append(cols[token_column])
        if tag_column is not None:
            tags.append(cols[tag_column])
    flush()
    return sentences


def _check_conll_columns(path: Path, line: int, width: int, token_column: int, tag_column: Optional[int]) -> None:
    for name, column in (("token_column", token_column), ("tag_column", tag_column)):
        if column is not None and not -width <= column < width:
            raise TaskDataError(f"{path}:{line}: {name}={column} is out of range: the line has {width} columns")
    if tag_column is not None and token_column % width == tag_column % width:
        raise TaskDataError(f"{path}:{line}: the line has {width} column(s) and tag_column={tag_column} is the "
                            "token column; expected token and tag columns (tag_column=None reads untagged files)")


# ---------------------------------------------------------------------------------------------
# Extractive question answering
# ---------------------------------------------------------------------------------------------

def read_squad(path) -> list[QAExample]:
    """Questions of a SQuAD v1.1 or v2.0 JSON file (see the module doc), in file order."""
    path = Path(path)
    try:
        root = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                            "expected a SQuAD JSON file") from None
    articles = root.get("data") if isinstance(root, dict) else None
    if not isinstance(articles, list):
        raise TaskDataError(f"{path}: no 'data' list at the top level; expected a SQuAD JSON file "
                            '({"version": ..., "data": [...]})')
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    for i, article in enumerate(articles):
        for j, paragraph in enumerate(_json_list(article, "paragraphs", f"{path}: data[{i}]")):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise TaskDataError(f"{where}: 'context' is {_kind(paragraph, 'context')}; expected a string")
            for k, qa in enumerate(_json_list(paragraph, "qas", where)):
                example = _qa_example(qa, context, f"{where}.qas[{k}]")
                if example.id in seen:
                    raise TaskDataError(f"{example.source}: id {example.id!r} repeats {seen[example.id]}")
                seen[example.id] = example.source
                examples.append(example)
    return examples


def _kind(obj: dict, key: str) -> str:
    return "missing" if key not in obj else f"a JSON {type(obj[key]).__name__}"


def _json_list(obj, key: str, where: str) -> list[dict]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        found = _kind(obj, key) if isinstance(obj, dict) else f"in a JSON {type(obj).__name__}"
        raise TaskDataError(f"{where}: '{key}' is {found}; expected a list of objects")
    return value


def _qa_example(qa: dict, context: str, where: str) -> QAExample:
    qa_id = qa.get("id")
    if not isinstance(qa_id, (str, int)) or isinstance(qa_id, bool):
        raise TaskDataError(f"{where}: 'id' is {_kind(qa, 'id')}; expected a string")
    where = f"{where} (id {qa_id})"
    question = qa.get("question")
    if not isinstance(question, str):
        raise TaskDataError(f"{where}: 'question' is {_kind(qa, 'question')}; expected a string")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise TaskDataError(f"{where}: 'is_impossible' is {impossible!r}; expected true or false")
    answers = [_answer(a, context, f"{where}.answers[{n}]") for n, a in enumerate(_json_list(qa, "answers", where))]
    if impossible and answers:
        raise TaskDataError(f"{where}: is_impossible is true but it has {len(answers)} answer(s); expected none "
                            "(SQuAD v2.0 keeps those under 'plausible_answers')")
    return QAExample(str(qa_id), question, context, answers, impossible, where)


def _answer(answer: dict, context: str, where: str) -> Answer:
    text, start = answer.get("text"), answer.get("answer_start")
    if not isinstance(text, str) or not text:
        found = "empty" if text == "" else _kind(answer, "text")
        raise TaskDataError(f"{where}: 'text' is {found}; expected the answer string")
    if not isinstance(start, int) or isinstance(start, bool):
        raise TaskDataError(f"{where}: 'answer_start' is {_kind(answer, 'answer_start')}; expected a character "
                            "offset (integer)")
    found = context[start:start + len(text)] if start >= 0 else ""
    if found != text:
        raise TaskDataError(f"{where}: answer_start {start} does not match the context: expected {text!r} there, "
                            f"found {found!r}")
    return Answer(text, start)
