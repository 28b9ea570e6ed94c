"""Stage 1, read: input files to a stream of raw documents, in a fixed global order.

Formats: plain text (one document per line, or documents separated by blank lines: ``auto``
tells them apart per file, see ``text_separator``), JSONL (text field by name), WikiExtractor output
(``<doc ...>`` blocks) and MediaWiki XML dumps (streamed, markup stripped).  Inputs are files,
directories (recursive) and globs; compressed files are read transparently (see compression.py).
Bad input raises InputError through an ErrorPolicy, which either stops or skips and counts it;
nothing here holds more than one document in memory, but for the head of a text file that
``auto`` looks at (``SEPARATOR_SNIFF_CHARS``, ``SEPARATOR_SNIFF_LINES``).
"""
from __future__ import annotations

import glob
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from data_prep.compression import codec_error_message, codec_errors, open_binary
from data_prep.errors import ErrorPolicy, InputError, PrepError
from data_prep.settings import setting

FORMATS = ("auto", "text", "jsonl", "wikiextractor", "mediawiki")
DOC_SEPARATORS = ("auto", "line", "blank")
# ``auto`` decides from about this many characters at the head of a text file: enough for tens of
# documents of NVIDIA's format (a Wikipedia article, ~40 sentences), little to hold in memory.
SEPARATOR_SNIFF_CHARS = 4_000_000
SEPARATOR_SNIFF_LINES = 200_000  # and at most this many lines, blank ones included (each held in the head)
SNIFF_BYTES = 8192
EXTENSION_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".xml": "mediawiki"}
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".lzma", ".zst"}


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the input file
    line: int | None  # 1-based line where the document starts (None for XML pages)


@dataclass(frozen=True)
class ReadOptions:
    """How input files are read: the ``input`` section of data_prep's config (less its paths)."""

    format: Literal[FORMATS] = "auto"
    """Input format; ``auto`` sniffs the first bytes (and the extension) of each file."""
    doc_separator: Literal[DOC_SEPARATORS] = "auto"
    """Text format: one document per ``line``, or documents separated by ``blank`` lines (one sentence
    or paragraph per line, NVIDIA's format); ``auto`` chooses per file from its first 4 MB: ``blank``
    when it has at least 2 blank lines between non-blank lines and, on average, 2 or more non-blank
    lines between them, else ``line``."""
    jsonl_field: str = "text"
    """JSONL field holding the text."""
    max_line_bytes: int = setting(16 << 20, ge=1024)
    """Longer lines (and blank-separated documents) are bad input."""


def expand_inputs(specs: list[str | Path], is_output: Callable[[Path], bool] | None = None) -> list[Path]:
    """Files, directories (recursive, sorted, hidden files skipped) and globs, in the order given.

    Files for which ``is_output(resolved path)`` holds (data_prep's own outputs) are left out of
    directories and globs; naming one as an input is an error."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            if is_output and is_output(p.resolve()):
                raise PrepError(f"input {spec} is an output of data_prep (a shard, manifest, progress record or "
                                "tokenizer file of this run's output directory); give the corpus files")
            found = [p]
        elif glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        else:
            raise PrepError(f"input not found: {spec}")
        kept = [f for f in found if not is_output(f.resolve())] if is_output else found
        if not kept:
            raise PrepError(f"input {spec!r} matches no files" + (" but data_prep's own outputs" if found else ""))
        found = kept
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(f)
    return paths


def iter_documents(paths: list[Path], options: ReadOptions, policy: ErrorPolicy) -> Iterator[Document]:
    for path in paths:
        yield from read_file(path, options, policy)


def read_file(path: Path, options: ReadOptions, policy: ErrorPolicy) -> Iterator[Document]:
    """Documents of one file; a file-level problem is reported once and ends this file."""
    try:
        stream = open_binary(path)
    except InputError as err:
        policy.handle(err)
        return
    errors_before = sum(policy.counts.values())
    with stream:
        try:
            fmt = detect_format(path, stream, options.format)
            produced = False
            for doc in _READERS[fmt](path, stream, options, policy):
                produced = True
                yield doc
            if not produced and sum(policy.counts.values()) == errors_before:
                raise InputError(path, None, "no documents found: the file is empty or holds only whitespace "
                                 "(or empty records)", reason="empty_file")
        except codec_errors() as err:
            policy.handle(InputError(path, None, codec_error_message(err), reason="truncated_archive"))
        except InputError as err:
            policy.handle(err)


def detect_format(path: Path, stream, requested: str) -> str:
    """Check the head of the (decompressed) stream: binary data is refused, ``auto`` is resolved."""
    head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
    nul = head.find(b"\x00")
    if nul >= 0:
        raise InputError(path, None, f"binary data (NUL byte at offset {nul}); expected UTF-8 text "
                         "(UTF-16 text must be converted to UTF-8 first)", reason="binary_file")
    if requested not in FORMATS:
        raise PrepError(f"unknown input format {requested!r}; expected one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"<?xml") or start.startswith(b"<mediawiki"):
        return "mediawiki"
    if start.startswith(b"<doc ") or start.startswith(b"<doc>"):
        return "wikiextractor"
    name = path.name.lower()
    stem_suffix = Path(name[: -len(Path(name).suffix)]).suffix if Path(name).suffix in COMPRESSION_SUFFIXES \
        else Path(name).suffix
    if stem_suffix in EXTENSION_FORMAT:
        return EXTENSION_FORMAT[stem_suffix]
    if start.startswith(b"{") and _is_json_object(start.split(b"\n", 1)[0]):
        return "jsonl"
    return "text"


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # also a first line cut off by the sniff window: then it is text to us
        return False


def iter_lines(path: Path, stream, max_line_bytes: int, policy: ErrorPolicy) -> Iterator[tuple[int, str | None]]:
    """(line number, text without the newline); text is None for a line that was bad and skipped."""
    lineno = 0
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            _skip_rest_of_line(stream)
            policy.handle(InputError(path, lineno, f"line is longer than max_line_bytes={max_line_bytes}; "
                                     "expected one document per line (raise max_line_bytes if this is real)",
                                     reason="line_too_long"))
            yield lineno, None
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = raw[err.start: err.start + 8]
            policy.handle(InputError(path, lineno, f"invalid UTF-8 at byte {err.start} of the line ({bad!r}); "
                                     "expected UTF-8 text", reason="invalid_utf8"))
            yield lineno, None
            continue
        if lineno == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield lineno, text.rstrip("\r\n")


def _skip_rest_of_line(stream) -> None:
    while True:
        chunk = stream.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def read_text(path, stream, options: ReadOptions, policy) -> Iterator[Document]:
    lines = iter_lines(path, stream, options.max_line_bytes, policy)
    separator = options.doc_separator
    if separator == "auto":
        lines, separator = text_separator(path, lines)
    if separator == "line":
        for lineno, text in lines:
            if text is not None and text.strip():
                yield Document(text, str(path), lineno)
        return
    if separator != "blank":
        raise PrepError(f"doc_separator must be one of {DOC_SEPARATORS}, got {options.doc_separator!r}")
    yield from _read_blank_separated(path, lines, options.max_line_bytes, policy)


_separator_told: set[str] = set()  # files whose ``auto`` choice this process has printed


def text_separator(path, lines: Iterator[tuple[int, str | None]]) -> tuple[Iterator, str]:
    """(``lines`` again, from the first, ``line`` or ``blank``): ``auto``'s choice for one text file.

    Blank-separated when the first SEPARATOR_SNIFF_CHARS (of at most SEPARATOR_SNIFF_LINES lines, so a run of
    blank lines cannot grow the head without end) hold at least 2 breaks (blank lines between
    non-blank ones) and the runs between them average 2 or more lines: a stray blank line in a file
    of one document per line, or one between every line (where both readings agree), stays ``line``.
    A file with breaks prints its choice once per process (the vocab and shards passes read it too).
    Bad input met in the head is raised after the head's lines, where reading them would have met it."""
    head, chars, nonblank, breaks, gap = [], 0, 0, 0, False
    rest = lines
    try:
        for lineno, text in lines:
            head.append((lineno, text))
            if text is not None and not text.strip():
                gap = nonblank > 0
            else:
                nonblank += 1
                breaks += gap
                gap = False
                chars += len(text or "")
            if chars >= SEPARATOR_SNIFF_CHARS or len(head) >= SEPARATOR_SNIFF_LINES:
                break
    except (InputError, *codec_errors()) as err:
        rest = _raise(err)
    separator = "blank" if breaks >= 2 and nonblank >= 2 * (breaks + 1) else "line"
    if breaks and str(path) not in _separator_told:
        _separator_told.add(str(path))
        reading = "documents separated by blank lines" if separator == "blank" else "one document per line"
        other = "line" if separator == "blank" else "blank"
        counted = f"{breaks:,} blank-line break{'s' * (breaks != 1)} among its first {nonblank:,} non-blank lines"
        print(f"data_prep: {path}: {reading} ({counted}; --doc-separator {other} reads it otherwise)",
              file=sys.stderr)
    return itertools.chain(head, rest), separator


def _raise(err: Exception) -> Iterator:
    raise err
    yield  # a generator: raises when reached


def _read_blank_separated(path, lines, max_doc_bytes: int, policy) -> Iterator[Document]:
    parts: list[str] = []
    start, size, bad = None, 0, False
    for lineno, text in lines:
        if text is not None and not text.strip():
            if parts and not bad:
                yield Document("\n".join(parts), str(path), start)
            parts, start, size, bad = [], None, 0, False
            continue
        start = start or lineno
        if text is None:  # already reported; the whole document goes
            bad, parts = True, []
            continue
        size += len(text)
        if size > max_doc_bytes and not bad:
            policy.handle(InputError(path, start, f"document longer than max_line_bytes={max_doc_bytes}; "
                                     "expected blank lines between documents", reason="line_too_long"))
            bad, parts = True, []
        if not bad:
            parts.append(text)
    if parts and not bad:
        yield Document("\n".join(parts), str(path), start)


def read_jsonl(path, stream, options: ReadOptions, policy) -> Iterator[Document]:
    field = options.jsonl_field
    for lineno, text in iter_lines(path, stream, options.max_line_bytes, policy):
        if text is None or not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            policy.handle(InputError(path, lineno, f"invalid JSON ({err.msg} at column {err.colno}); "
                                     "expected one JSON object per line", reason="bad_json"))
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            what = "missing" if not isinstance(record, dict) or field not in record else \
                f"a {type(value).__name__}, not a string"
            policy.handle(InputError(path, lineno, f"text field {field!r} is {what}; expected a JSON object "
                                     f"with a string field {field!r} (set jsonl_field)", reason="missing_field"))
            continue
        if value.strip():
            yield Document(value, str(path), lineno)


DOC_OPEN = re.compile(r"^<doc(\s[^>]*)?>\s*$")
DOC_TITLE = re.compile(r'\btitle="([^"]*)"')


def read_wikiextractor(path, stream, options: ReadOptions, policy) -> Iterator[Document]:
    """``<doc id=.. url=.. title=..>`` ... ``</doc>`` blocks; the title line WikiExtractor repeats is dropped."""
    parts: list[str] | None = None
    start, title, bad = None, None, False
    for lineno, text in iter_lines(path, stream, options.max_line_bytes, policy):
        if text is None:
            bad = True
            continue
        stripped = text.strip()
        opening = DOC_OPEN.match(stripped)
        if opening:
            if parts is not None:
                policy.handle(InputError(path, start, "<doc> block not closed before the next <doc>; "
                                         "expected </doc>", reason="malformed"))
            m = DOC_TITLE.search(opening.group(1) or "")
            parts, start, title, bad = [], lineno, (m.group(1) if m else None), False
        elif stripped == "</doc>":
            if parts is None:
                policy.handle(InputError(path, lineno, "</doc> without an opening <doc ...>", reason="malformed"))
                continue
            if parts and title is not None and parts[0].strip() == title:
                parts = parts[1:]
            body = "\n".join(parts)
            if body.strip() and not bad:
                yield Document(body, str(path), start)
            parts = None
        elif parts is not None:
            parts.append(text)
        elif stripped:
            policy.handle(InputError(path, lineno, "text outside a <doc ...> block; expected WikiExtractor output",
                                     reason="malformed"))
    if parts is not None:
        policy.handle(InputError(path, start, "file ends inside a <doc> block (truncated?); expected </doc>",
                                 reason="malformed"))


def read_mediawiki(path, stream, options: ReadOptions, policy) -> Iterator[Document]:
    from data_prep.wikitext import iter_mediawiki_pages

    yield from iter_mediawiki_pages(path, stream, policy)


_READERS = {"text": read_text, "jsonl": read_jsonl, "wikiextractor": read_wikiextractor,
            "mediawiki": read_mediawiki}
