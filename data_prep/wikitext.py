"""MediaWiki XML dumps: stream ``<page>`` elements and strip wiki markup to plain text.

The stripper is deliberately simple (no template expansion): templates, tables, references,
files/categories, comments and HTML tags are dropped; links keep their label; bold/italic quotes,
heading markers and list bullets go.  Good enough for language-model pretraining text.
"""
from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import Iterator

from data_prep.errors import ErrorPolicy, InputError

ARTICLE_NAMESPACE = "0"

COMMENT = re.compile(r"<!--.*?-->", re.S)
REF_PAIRED = re.compile(r"<ref\b[^>/]*>.*?</ref\s*>", re.S | re.I)
REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
DROP_BLOCKS = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|score|chem|hiero|imagemap|graph)\b"
                         r"[^>]*>.*?</\1\s*>", re.S | re.I)
INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
LINK_PREFIX = r"(?:[Ff]ile|[Ii]mage|[Cc]ategory|[Mm]edia|[a-z]{2,3}(?:-[a-z]+)?):"
INNER_FILE_LINK = re.compile(rf"\[\[{LINK_PREFIX}[^\[\]]*\]\]")  # files, categories, interlanguage
INNER_LINK = re.compile(rf"\[\[(?!{LINK_PREFIX})([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
BOLD_ITALIC = re.compile(r"'{2,}")
HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.M)
LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*/?>")
MAGIC_WORD = re.compile(r"__[A-Z]+__")


def _remove_nested(pattern: re.Pattern, text: str, repl: str = "") -> str:
    # Innermost first, until nothing matches: handles nesting without a parser.
    while True:
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def strip_wiki_markup(text: str) -> str:
    text = COMMENT.sub("", text)
    text = REF_PAIRED.sub("", text)
    text = REF_SELF.sub("", text)
    text = DROP_BLOCKS.sub("", text)
    text = _remove_nested(INNER_TEMPLATE, text)
    text = _remove_nested(INNER_TABLE, text)
    while True:  # links inside file captions first, then the (now innermost) file link
        before = text
        text = INNER_LINK.sub(lambda m: m.group(2) if m.group(2) is not None else m.group(1), text)
        text = INNER_FILE_LINK.sub("", text)
        if text == before:
            break
    text = EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = BOLD_ITALIC.sub("", text)
    text = HEADING.sub("", text)  # section titles are not sentences
    text = LIST_MARKER.sub("", text)
    text = HTML_TAG.sub("", text)
    text = MAGIC_WORD.sub("", text)
    text = html.unescape(text)
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line and any(ch.isalnum() for ch in line))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_mediawiki_pages(path, stream, policy: ErrorPolicy) -> Iterator:
    """Article pages (namespace 0, not redirects) of a dump, as Documents; memory stays per-page."""
    from data_prep.readers import Document

    events = ET.iterparse(stream, events=("start", "end"))
    root = None
    try:
        for event, elem in events:
            if root is None:
                root = elem
                if _local(elem.tag) != "mediawiki":
                    raise InputError(path, 1, f"XML root is <{_local(elem.tag)}>; expected a MediaWiki dump "
                                     "(<mediawiki> root)", reason="unknown_format")
            if event != "end" or _local(elem.tag) != "page":
                continue
            doc = _page_document(path, elem)
            root.clear()  # drop finished pages: memory stays bounded on a full dump
            if doc is not None:
                yield Document(doc, str(path), None)
    except ET.ParseError as err:
        line, column = err.position
        policy.handle(InputError(path, line, f"malformed XML at column {column} ({err.msg}); "
                                 "expected a well-formed MediaWiki dump (truncated?)", reason="malformed"))


def _page_document(path, page) -> str | None:
    fields = {_local(child.tag): child for child in page}
    ns = fields.get("ns")
    if ns is not None and (ns.text or "").strip() != ARTICLE_NAMESPACE:
        return None
    if "redirect" in fields:
        return None
    revision = fields.get("revision")
    text_elem = None
    if revision is not None:
        for child in revision:
            if _local(child.tag) == "text":
                text_elem = child
    raw = (text_elem.text or "") if text_elem is not None else ""
    if raw.lstrip().upper().startswith("#REDIRECT"):
        return None
    text = strip_wiki_markup(raw)
    return text or None
