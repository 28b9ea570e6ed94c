"""Stage 2, clean: normalise text, drop junk, de-duplicate exactly across the whole corpus.

``clean_text`` is a pure function of (text, options).  ``clean_documents`` streams documents in
global order, drops empty, short and duplicate ones (first occurrence wins) and counts every drop.
De-duplication keeps one 64-bit hash per unique document in an open-addressing table (about 16
bytes per document), never the texts, so memory stays bounded by the number of documents, not
their size.
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, NamedTuple


from data_prep.settings import setting

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")

# Control and invisible format characters (whitespace controls are left to the whitespace step,
# and ZWJ/ZWNJ stay: scripts and emoji need them).  U+FFFD comes from lossy upstream decoding.
INVISIBLE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e"
                       "\u2060-\u2064\u2066-\u2069\ufeff\ufff9-\ufffb\ufffd\ufffe\uffff]")
HTML_TAG_NAMES = ("a|abbr|b|big|blockquote|body|br|caption|center|cite|code|dd|del|div|dl|dt|em|font|"
                  "h[1-6]|head|hr|html|i|img|ins|kbd|li|meta|nowiki|ol|p|pre|ref|references|s|small|span|"
                  "strike|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul|var|wbr|section|article|nav|"
                  "header|footer|script|style|noscript|link|input|form|label|button|iframe|figure|"
                  "figcaption|onlyinclude|includeonly|noinclude")
HTML_TAG = re.compile(rf"</?(?:{HTML_TAG_NAMES})\b[^<>]{{0,500}}?/?>", re.I)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.S | re.I)
HTML_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});")


@dataclass(frozen=True)
class CleanOptions:
    """The ``clean`` section of data_prep's config."""

    unicode_form: Literal[UNICODE_FORMS] = "NFKC"
    """Unicode normalization; NFKC also folds full-width digits and letters (common in Chinese text)."""
    strip_markup: bool = True
    """Remove stray HTML tags, comments and entities."""
    min_doc_chars: int = setting(20, ge=0)
    """Drop shorter documents (counted after cleaning)."""
    dedup: bool = True
    """Exact de-duplication of documents across the whole corpus (the first occurrence is kept)."""


class CleanDoc(NamedTuple):
    text: str
    source: str
    line: int | None
    digest: bytes  # 16-byte blake2b of the cleaned text (dedup key and split key)


def clean_text(text: str, options: CleanOptions = CleanOptions()) -> str:
    """Normalised text with markup and invisible characters removed; paragraphs kept as lines."""
    if options.strip_markup:
        if "<" in text:
            text = HTML_COMMENT.sub(" ", SCRIPT_STYLE.sub(" ", text))
            text = HTML_TAG.sub(" ", text)
        if "&" in text:
            text = HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    if options.unicode_form != "none":
        text = unicodedata.normalize(options.unicode_form, text)
    text = INVISIBLE.sub("", text)
    # splitlines() knows every Unicode line break; split() every Unicode space (incl. U+3000).
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class HashSet64:
    """A set of 64-bit hashes in one flat array (linear probing; 0 marks an empty slot)."""

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 18):
        capacity = 1 << max(4, (capacity - 1).bit_length())
        self._slots = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return len(self._slots) * 8

    def add(self, h: int) -> bool:
        """Insert ``h``; True if it was new.  ``h`` must be uniformly distributed (a hash)."""
        h = h or 1
        slots, mask = self._slots, self._mask
        i = h & mask
        while True:
            v = slots[i]
            if v == 0:
                break
            if v == h:
                return False
            i = (i + 1) & mask
        slots[i] = h
        self._size += 1
        if self._size > self.MAX_LOAD * len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        """Double the table, re-inserting every value with numpy (a Python loop here would cost more
        than all the lookups): rounds of "claim your current slot if empty, else probe the next"."""
        import numpy as np   # here, not at import: every data_prep command (--help too) imports this module

        values = np.frombuffer(self._slots, dtype=np.uint64)
        values = values[values != 0]
        table = np.zeros(2 * len(self._slots), dtype=np.uint64)
        mask = len(table) - 1
        pos = (values & np.uint64(mask)).astype(np.int64)
        pending = np.arange(len(values))
        while pending.size:
            at = pos[pending]
            free = np.flatnonzero(table[at] == 0)
            slots, first = np.unique(at[free], return_index=True)  # one winner per free slot
            table[slots] = values[pending[free[first]]]
            lost = np.ones(pending.size, dtype=bool)
            lost[free[first]] = False
            pending = pending[lost]
            pos[pending] = (pos[pending] + 1) & mask
        self._slots = array("Q", table.tobytes())
        self._mask = mask


def clean_documents(docs: Iterable, options: CleanOptions, counts: Counter) -> Iterator[CleanDoc]:
    """Clean, filter and de-duplicate a document stream, counting what is dropped and why.

    ``counts`` gets: docs_read, docs_kept, dropped_empty, dropped_short, dropped_duplicate,
    chars_read, chars_kept (added when the stream ends or is closed).
    """
    seen = HashSet64() if options.dedup else None
    read = kept = empty = short = duplicate = chars_read = chars_kept = 0
    try:
        for doc in docs:
            read += 1
            chars_read += len(doc.text)
            text = clean_text(doc.text, options)
            if not text:
                empty += 1
                continue
            if len(text) < options.min_doc_chars:
                short += 1
                continue
            digest = text_digest(text)
            if seen is not None and not seen.add(int.from_bytes(digest[:8], "little")):
                duplicate += 1
                continue
            kept += 1
            chars_kept += len(text)
            yield CleanDoc(text, doc.source, doc.line, digest)
    finally:  # plain ints in the loop: a Counter update per document costs more than the hash
        counts.update(docs_read=read, docs_kept=kept, dropped_empty=empty, dropped_short=short,
                      dropped_duplicate=duplicate, chars_read=chars_read, chars_kept=chars_kept)
