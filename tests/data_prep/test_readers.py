"""Readers: every format, compression codec, input expansion, and each kind of bad input."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zipfile

import pytest
import zstandard

from data_prep.errors import ErrorPolicy, InputError, PrepError
from data_prep.readers import ReadOptions, expand_inputs, iter_documents, read_file, text_separator
from data_prep.wikitext import strip_wiki_markup


def read(path, policy=None, **opts):
    return [d.text for d in read_file(path, ReadOptions(**opts), policy or ErrorPolicy("stop"))]


def test_text_one_document_per_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufefffirst doc\r\n\n  \nsecond doc\nthird".encode())
    docs = list(read_file(p, ReadOptions(), ErrorPolicy("stop")))
    assert [d.text for d in docs] == ["first doc", "second doc", "third"]
    assert [d.line for d in docs] == [1, 4, 5]
    assert docs[0].source == str(p)


def test_text_blank_line_separated_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("s1 of d1\ns2 of d1\n\n\ns1 of d2\n \ns1 of d3\n")
    assert read(p, doc_separator="blank") == ["s1 of d1\ns2 of d1", "s1 of d2", "s1 of d3"]


# NVIDIA's input format: one sentence per line, a blank line between documents
NVIDIA_DOCS = [["The cat sat on the mat.", "It was warm there.", "Then it left."],
               ["A second document begins.", "It has two sentences."], ["The third has one."],
               ["The fourth opens.", "And closes."]]


def test_auto_separator_reads_nvidia_format_by_blank_lines(tmp_path, monkeypatch, capsys):
    text = "\n\n".join("\n".join(doc) for doc in NVIDIA_DOCS) + "\n"
    plain, packed = tmp_path / "wiki.txt", tmp_path / "wiki.txt.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    documents = ["\n".join(doc) for doc in NVIDIA_DOCS]
    for path in (plain, packed):
        assert read(path) == documents
        assert read(path, doc_separator="line") == [s for doc in NVIDIA_DOCS for s in doc]
        assert read(path, doc_separator="blank") == documents
    told = capsys.readouterr().err.splitlines()
    assert told == [f"data_prep: {path}: documents separated by blank lines (3 blank-line breaks among its first 8 "
                    "non-blank lines; --doc-separator line reads it otherwise)" for path in (plain, packed)]
    assert read(plain) == documents and not capsys.readouterr().err  # told once per file
    # decided on the head of the file; the rest is read on from where the look stopped
    monkeypatch.setattr("data_prep.readers.SEPARATOR_SNIFF_CHARS", 110)
    long = tmp_path / "long.txt"
    long.write_text("\n\n".join([text.strip()] * 3) + "\n")
    docs = list(read_file(long, ReadOptions(), ErrorPolicy("stop")))
    assert [d.text for d in docs] == documents * 3
    assert [d.line for d in docs][:5] == [1, 5, 8, 10, 13]
    assert "(2 blank-line breaks among its first 6 non-blank lines" in capsys.readouterr().err


def test_auto_separator_keeps_one_document_per_line(tmp_path, capsys):
    stray = tmp_path / "reviews.txt"  # a file of one document per line with a stray blank line
    stray.write_text("great\nawful\n\nfine\nok\n")
    assert read(stray) == ["great", "awful", "fine", "ok"]
    spaced = tmp_path / "spaced.txt"  # a blank line after every line: both readings agree
    spaced.write_text("one\n\ntwo\n\nthree\n")
    assert read(spaced) == ["one", "two", "three"] == read(spaced, doc_separator="blank")
    told = capsys.readouterr().err.splitlines()
    assert told == [f"data_prep: {stray}: one document per line (1 blank-line break among its first 4 non-blank "
                    "lines; --doc-separator blank reads it otherwise)",
                    f"data_prep: {spaced}: one document per line (2 blank-line breaks among its first 3 non-blank "
                    "lines; --doc-separator blank reads it otherwise)"]
    dense = tmp_path / "dense.txt"
    dense.write_text("a\nb\n")
    assert read(dense) == ["a", "b"] and not capsys.readouterr().err  # no blank line: nothing to tell


def test_jsonl_field_by_name(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"body": "one", "id": 1}, {"body": "two"}]) + "\n")
    assert read(p, jsonl_field="body") == ["one", "two"]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(InputError) as err:
        read(p)
    assert err.value.line == 2 and str(p) in str(err.value) and "'text'" in str(err.value)
    policy = ErrorPolicy("skip", max_warnings=0)
    assert read(p, policy) == ["ok"] and policy.counts["missing_field"] == 1


def test_jsonl_invalid_json(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken\n{"text": "after"}\n')
    with pytest.raises(InputError, match=r"a\.jsonl:2: invalid JSON"):
        read(p)
    policy = ErrorPolicy("skip", max_warnings=0)
    assert read(p, policy) == ["ok", "after"] and policy.counts["bad_json"] == 1


def test_wikiextractor_blocks(tmp_path):
    p = tmp_path / "wiki_00"
    p.write_text('<doc id="1" url="https://x/?curid=1" title="Alpha">\nAlpha\n\nAlpha is a letter.\n'
                 'It comes first.\n</doc>\n<doc id="2" url="u" title="Beta">\nBeta\nBeta follows alpha.\n</doc>\n')
    assert read(p) == ["\nAlpha is a letter.\nIt comes first.", "Beta follows alpha."]


def test_wikiextractor_unterminated_block(tmp_path):
    p = tmp_path / "wiki_00"
    p.write_text('<doc id="1" title="A">\nA\nbody text here\n</doc>\n<doc id="2" title="B">\nB\ncut off')
    with pytest.raises(InputError, match="ends inside a <doc> block"):
        read(p)
    assert read(p, ErrorPolicy("skip", max_warnings=0)) == ["body text here"]


MEDIAWIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Test</sitename></siteinfo>
  <page><title>Anarchism</title><ns>0</ns><id>12</id>
    <revision><id>1</id><text xml:space="preserve">{{Infobox|name={{nested|x}}}}
'''Anarchism''' is a [[political philosophy]] and [[Social movement|movement]].&lt;ref&gt;Cite me&lt;/ref&gt;
== History ==
* It is old.{{citation needed}}
{| class="wikitable"
| a || b
|}
[[File:A.png|thumb|A [[caption]] here]]
See [https://example.org the site] for more.
[[Category:Philosophy]]</text></revision></page>
  <page><title>AccessibleComputing</title><ns>0</ns><id>10</id><redirect title="Computer accessibility" />
    <revision><id>2</id><text>#REDIRECT [[Computer accessibility]]</text></revision></page>
  <page><title>Talk:Anarchism</title><ns>1</ns><id>13</id>
    <revision><id>3</id><text>Talk page text.</text></revision></page>
</mediawiki>
"""


def test_mediawiki_dump_articles_only_markup_stripped(tmp_path):
    p = tmp_path / "dump.xml.bz2"
    p.write_bytes(bz2.compress(MEDIAWIKI.encode()))
    assert read(p) == ["Anarchism is a political philosophy and movement.\nIt is old.\nSee the site for more."]


def test_mediawiki_truncated_xml(tmp_path):
    p = tmp_path / "dump.xml"
    p.write_text(MEDIAWIKI[: MEDIAWIKI.index("<page><title>Talk")] + "<page><title>Cut")
    with pytest.raises(InputError, match="malformed XML"):
        read(p)
    assert len(read(p, ErrorPolicy("skip", max_warnings=0))) == 1  # the page before the damage


def test_strip_wiki_markup_keeps_link_labels():
    assert strip_wiki_markup("A [[b|c]] and [[d]] ''e'' &amp; f<br/>") == "A c and d e & f"


CONTENT = "line one of the text\nline two of the text\n"
CODECS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
          ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


@pytest.mark.parametrize("suffix", list(CODECS))
def test_compressed_inputs_read_transparently(tmp_path, suffix):
    p = tmp_path / f"a.txt{suffix}"
    p.write_bytes(CODECS[suffix](CONTENT.encode()))
    assert read(p) == ["line one of the text", "line two of the text"]


def test_zstd_multiple_frames(tmp_path):
    p = tmp_path / "a.zst"
    c = zstandard.ZstdCompressor()
    p.write_bytes(c.compress(b"first frame\n") + c.compress(b"second frame\n"))
    assert read(p) == ["first frame", "second frame"]


def test_codec_found_by_magic_without_extension(tmp_path):
    p = tmp_path / "a.data"
    p.write_bytes(gzip.compress(CONTENT.encode()))
    assert len(read(p)) == 2


@pytest.mark.parametrize("suffix", list(CODECS))
def test_truncated_archive_is_reported_and_earlier_documents_kept(tmp_path, suffix):
    # bzip2 blocks hold 900 kB of text: several are needed for any text to come before the damage
    body = "".join(f"document number {i} with some words\n" for i in range(90000)).encode()
    packed = CODECS[suffix](body)
    p = tmp_path / f"cut.txt{suffix}"
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match="truncated archive|corrupt archive") as err:
        read(p)
    assert str(p) in str(err.value)
    policy = ErrorPolicy("skip", max_warnings=0)
    docs = read(p, policy)
    assert policy.counts["truncated_archive"] == 1
    assert 0 < len(docs) < 90000 and docs[0] == "document number 0 with some words"


def test_extension_that_lies(tmp_path):
    p = tmp_path / "plain.txt.gz"
    p.write_text(CONTENT)
    with pytest.raises(InputError, match="name says gzip"):
        read(p)


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nbad \xff\xfe line\nanother good line\n")
    with pytest.raises(InputError) as err:
        read(p)
    assert err.value.line == 2 and "invalid UTF-8" in str(err.value) and str(p) in str(err.value)
    policy = ErrorPolicy("skip", max_warnings=0)
    assert read(p, policy) == ["good line", "another good line"]
    assert policy.counts["invalid_utf8"] == 1


def test_gigantic_line_is_skipped_with_bounded_reads(tmp_path):
    p = tmp_path / "big.txt"
    p.write_bytes(b"short\n" + b"x" * 50_000 + b"\nafter\n")
    with pytest.raises(InputError, match="big.txt:2: line is longer than max_line_bytes=4096"):
        read(p, max_line_bytes=4096)
    policy = ErrorPolicy("skip", max_warnings=0)
    assert read(p, policy, max_line_bytes=4096) == ["short", "after"]
    assert policy.counts["line_too_long"] == 1


def test_empty_and_whitespace_files(tmp_path):
    for name, data in (("empty.txt", b""), ("blank.txt.gz", gzip.compress(b"\n  \n\t\n"))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(InputError, match="no documents found"):
            read(p)
        policy = ErrorPolicy("skip", max_warnings=0)
        assert read(p, policy) == [] and policy.counts["empty_file"] == 1


def test_binary_file(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(InputError, match=r"model\.bin: binary data \(NUL byte at offset 0\)"):
        read(p)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("hello world\n".encode("utf-16"))
    with pytest.raises(InputError, match="UTF-16"):
        read(utf16)


def test_unknown_formats_are_refused(tmp_path):
    z = tmp_path / "corpus.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.txt", "text")
    with pytest.raises(InputError, match="zip archive"):
        read(z)
    xml = tmp_path / "other.xml"
    xml.write_text("<?xml version='1.0'?><rss><item>x</item></rss>")
    with pytest.raises(InputError, match="expected a MediaWiki dump"):
        read(xml)
    with pytest.raises(PrepError, match="unknown input format 'pdf'"):
        read(xml, format="pdf")


def test_expand_inputs_files_dirs_globs(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden.txt"):
        (d / name).write_text("x\n")
    found = expand_inputs([str(d)])
    assert [p.relative_to(d).as_posix() for p in found] == ["a.txt", "b.txt", "sub/c.txt"]
    assert expand_inputs([str(d / "*.txt"), str(d / "a.txt")]) == [d / "a.txt", d / "b.txt"]
    with pytest.raises(PrepError, match="input not found"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(PrepError, match="matches no files"):
        expand_inputs([str(d / "*.json")])


def test_skip_goes_on_with_the_next_file(tmp_path):
    bad = tmp_path / "a_bad.bin"
    bad.write_bytes(b"\0\0\0")
    good = tmp_path / "b_good.txt"
    good.write_text("kept document\n")
    policy = ErrorPolicy("skip", max_warnings=0)
    docs = list(iter_documents(expand_inputs([str(tmp_path)]), ReadOptions(), policy))
    assert [d.text for d in docs] == ["kept document"] and policy.counts["binary_file"] == 1
    with pytest.raises(InputError, match="a_bad.bin"):
        list(iter_documents(expand_inputs([str(tmp_path)]), ReadOptions(), ErrorPolicy("stop")))


def test_real_compressed_corpora_read(corpora_dir):
    for name in ("en_linuxdoc.txt.xz", "zh_reviews.txt.gz"):
        docs = []
        for doc in read_file(corpora_dir / name, ReadOptions(), ErrorPolicy("stop")):
            docs.append(doc)
            if len(docs) == 500:
                break
        assert len(docs) == 500 and all(d.text.strip() for d in docs)


def test_auto_format_detection(tmp_path):
    jsonl = tmp_path / "records"
    jsonl.write_text('{"text": "from a record"}\n')
    brace = tmp_path / "notes.txt"
    brace.write_text("{braces} open this plain text line\nsecond line\n")
    wiki = tmp_path / "wiki_00"
    wiki.write_text('<doc id="1" title="T">\nT\nbody\n</doc>\n')
    assert read(jsonl) == ["from a record"]
    assert read(brace) == ["{braces} open this plain text line", "second line"]
    assert read(wiki) == ["body"]


def test_auto_separator_head_is_bounded_in_lines(monkeypatch):
    """Blank lines hold no characters, yet each is kept in the head: a file of millions of them must not
    all be held before ``auto`` decides."""
    monkeypatch.setattr("data_prep.readers.SEPARATOR_SNIFF_LINES", 1000)
    consumed = 0

    def lines():
        nonlocal consumed
        for lineno in range(1, 1_000_001):
            consumed += 1
            yield lineno, "" if lineno < 1_000_000 else "text"

    rest, separator = text_separator("blank.txt", lines())
    assert consumed == 1000 and separator == "line"
    assert sum(1 for _ in rest) == 1_000_000  # the head replayed, then read on
