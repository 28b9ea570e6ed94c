"""Stage 3, sentence splitting: rule-based, offline, English and Chinese (and mixed) text.

Good enough for NSP/SOP, where a boundary a little off costs little.  Rules, applied per line
(a line break always ends a sentence):
  * Chinese/Japanese: after 。！？ (or ! ? right after a CJK character: NFKC folds ！？ to ASCII),
    with any closing quotes or brackets that follow.  No space is needed.
  * Latin script: after . ! ? (and closing quotes/brackets) followed by whitespace and a capital
    letter, digit or opening quote; not after a known abbreviation (Mr. e.g. U.S.) or an initial.
"""
from __future__ import annotations

import re

CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CLOSERS = "\"'\u201d\u2019\u300d\u300f\uff09)\\]\u3011\u300b\u3009"
OPENERS = "\"'\u201c\u2018(\\[\u300c\u300e\u3010\u300a"
UPPER_START = "A-Z0-9\u00c0-\u00d6\u00d8-\u00de\u0391-\u03a9\u0410-\u042f"
LATIN_END = rf"[.!?]+[{CLOSERS}]*(?=\s+[{OPENERS}]*[{UPPER_START}{CJK}])"
CJK_END = rf"(?:[\u3002\uff01\uff1f]|(?<=[{CJK}])[!?])[\u3002\uff01\uff1f!?]*[{CLOSERS}]*"
# The alternation is 3-4x slower than the Latin rule alone, so lines without CJK skip it.
SENTENCE_END = re.compile(f"{CJK_END}|{LATIN_END}")
SENTENCE_END_LATIN = re.compile(LATIN_END)
HAS_CJK = re.compile(f"[{CJK}\u3002\uff01\uff1f]")
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof st sr jr vs etc e.g i.e cf inc ltd co corp gen col capt lt sgt rev hon gov sen rep mt
no nos fig figs vol vols pp p ch sec art jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m approx
dept est ft govt mssrs messrs mme mlle u.s u.k u.n ph.d b.a m.a d.c esq viz al ed eds op ibid
""".split())
INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")
WORD_BEFORE = re.compile(r"(\S+)$")
_CLOSER_CHARS = CLOSERS.replace("\\", "")
_OPENER_CHARS = OPENERS.replace("\\", "")


def _is_abbreviation(line: str, period_at: int) -> bool:
    m = WORD_BEFORE.search(line, max(0, period_at - 24), period_at)
    if not m:
        return False
    word = m.group(1).lstrip(_OPENER_CHARS)
    if not word:
        return False
    if word.lower() in ABBREVIATIONS:
        return True
    # A single capital initial ("J. Smith") or dotted initials ("U.S.A.", "e.g.").
    return (len(word) == 1 and word.isupper()) or ("." in word and INITIALS.fullmatch(word) is not None)


def split_line(line: str) -> list[str]:
    pattern = SENTENCE_END if HAS_CJK.search(line) else SENTENCE_END_LATIN
    sentences, start = [], 0
    for m in pattern.finditer(line):
        if line[m.start()] == "." and m.group().rstrip(_CLOSER_CHARS) == "." and _is_abbreviation(line, m.start()):
            continue
        piece = line[start:m.end()].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    rest = line[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of a cleaned document, in order; each line is split on its own."""
    out: list[str] = []
    for line in text.split("\n"):
        out.extend(split_line(line))
    return out
