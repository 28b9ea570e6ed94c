"""Cleaning: normalization, junk removal, whitespace, length filter, exact de-duplication."""
from __future__ import annotations

import random
from collections import Counter

from data_prep.clean import CleanOptions, HashSet64, clean_documents, clean_text
from data_prep.readers import Document


def test_nfkc_folds_full_width_and_ligatures():
    assert clean_text("１９９８年 ＡＢＣ ﬁne") == "1998年 ABC fine"
    assert clean_text("１９９８", CleanOptions(unicode_form="NFC")) == "１９９８"


def test_control_and_invisible_characters_removed():
    assert clean_text("a\x00b\x07c\u200bd\ufeffe\u00adf\ufffdg") == "abcdefg"
    assert clean_text("emoji \U0001F469\u200d\U0001F4BB stays") == "emoji \U0001F469\u200d\U0001F4BB stays"


def test_markup_and_entities_removed_but_prose_kept():
    text = "<p>Hello&nbsp;<b>world</b> &amp; more</p><!-- note --><script>var x;</script>"
    assert clean_text(text) == "Hello world & more"
    assert clean_text("type(1) is <class 'int'> and a < b > c") == "type(1) is <class 'int'> and a < b > c"
    assert clean_text("<b>x</b>", CleanOptions(strip_markup=False)) == "<b>x</b>"


def test_whitespace_collapsed_paragraphs_kept():
    assert clean_text("  a \t b\u3000c \r\n\n\n  d  e \u2028 f") == "a b c\nd e\nf"


def docs(*texts):
    return [Document(t, "mem", i + 1) for i, t in enumerate(texts)]


def test_filters_and_dedup_with_counts():
    counts = Counter()
    out = list(clean_documents(docs("a long enough document", "short", "   ", "a long  enough document",
                                    "another long document", "a long enough document"),
                               CleanOptions(min_doc_chars=10), counts))
    assert [d.text for d in out] == ["a long enough document", "another long document"]
    assert [d.line for d in out] == [1, 5]  # the first occurrence wins
    assert counts["docs_read"] == 6 and counts["docs_kept"] == 2
    assert counts["dropped_short"] == 1 and counts["dropped_empty"] == 1 and counts["dropped_duplicate"] == 2
    kept = list(clean_documents(docs("same text here", "same text here"), CleanOptions(dedup=False, min_doc_chars=1), Counter()))
    assert len(kept) == 2


def test_hashset64_matches_a_python_set_through_growth():
    rng = random.Random(0)
    values = [rng.getrandbits(64) for _ in range(20000)] + [0, 1]
    values += values[:5000]  # repeats
    table, reference = HashSet64(capacity=16), set()
    for v in values:
        assert table.add(v) == ((v or 1) not in reference)
        reference.add(v or 1)
    assert len(table) == len(reference)
    assert table.nbytes <= 8 * 4 * len(reference)  # bounded: at most 32 bytes per unique hash
