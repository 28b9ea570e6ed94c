"""Sentence splitting for English, Chinese and mixed text."""
from __future__ import annotations

import gzip

from data_prep.clean import clean_text
from data_prep.sentences import split_sentences


def test_english_boundaries_and_abbreviations():
    text = ('Mr. Smith went to Washington. He met Dr. Jones at 5 p.m. on Jan. 3. It was fine! Was it? '
            '"Yes." She said so. J. R. R. Tolkien wrote. The U.S. Army is big. See e.g. the results. Pi is 3.14.')
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.", "He met Dr. Jones at 5 p.m. on Jan. 3.", "It was fine!", "Was it?",
        '"Yes."', "She said so.", "J. R. R. Tolkien wrote.", "The U.S. Army is big.", "See e.g. the results.",
        "Pi is 3.14."]


def test_no_split_before_lowercase_or_inside_tokens():
    assert split_sentences("It costs 3.50 dollars. see www.example.com now.") == \
        ["It costs 3.50 dollars. see www.example.com now."]


def test_lines_are_hard_boundaries():
    assert split_sentences("no punctuation here\nnext paragraph") == ["no punctuation here", "next paragraph"]


def test_chinese_boundaries_with_closing_quotes():
    text = "我爱北京。天安门上太阳升！你好吗？“好的。”他说。……然后呢"
    assert split_sentences(text) == ["我爱北京。", "天安门上太阳升！", "你好吗？", "“好的。”", "他说。", "……然后呢"]


def test_chinese_after_nfkc_uses_ascii_marks():
    assert split_sentences(clean_text("你好！我很好？谢谢。")) == ["你好!", "我很好?", "谢谢。"]


def test_mixed_chinese_and_english():
    out = split_sentences("他说：我们用BERT模型。Then we trained it. Done.")
    assert out == ["他说：我们用BERT模型。", "Then we trained it.", "Done."]


def test_sentences_of_real_english_text(corpora_dir):
    with gzip.open(corpora_dir / "en_sotu.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(2_000_000)
    sentences = [s for line in text.split("\n") for s in split_sentences(clean_text(line))]
    lengths = sorted(len(s) for s in sentences)
    # The addresses are long lines of ordinary prose: sentences of a typical length come out
    # (the splitter's speed is in bench/data_prep_throughput.py, not a test).
    assert 80 <= lengths[len(lengths) // 2] <= 250
    assert sum(1 for s in sentences if s[0].islower()) < 0.02 * len(sentences)
    assert sum(1 for s in sentences if s.endswith((".", "?", "!", '."', '?"'))) > 0.95 * len(sentences)
