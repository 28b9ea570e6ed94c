"""Vocabulary: deterministic training, import of vocab.txt / tokenizer.json, transformers compatibility."""
from __future__ import annotations

import json

import pytest

from data_prep.errors import PrepError
from data_prep.vocab import (SPECIAL_TOKENS, load_tokenizer_dir, read_tokenizer, save_tokenizer_dir,
                             tokenizer_hash, tokenizer_info, train_wordpiece)
from tests.data_prep.conftest import ZH_DOCS, english_docs


def test_training_is_deterministic_and_special_ids_fixed():
    docs = english_docs(150_000)
    a = train_wordpiece(lambda: iter(docs), 1500, lowercase=True)
    b = train_wordpiece(lambda: iter(docs), 1500, lowercase=True)
    assert tokenizer_hash(a) == tokenizer_hash(b)
    assert a.get_vocab() == b.get_vocab()
    info = tokenizer_info(a)
    assert (info.pad_id, info.unk_id, info.cls_id, info.sep_id, info.mask_id) == (0, 1, 2, 3, 4)
    assert info.vocab_size == 1500 and info.lowercase and info.token_dtype == "uint16"


def test_cased_and_uncased():
    docs = ["Hello World, Hello There"] * 50
    cased = train_wordpiece(lambda: iter(docs), 100, lowercase=False)
    uncased = train_wordpiece(lambda: iter(docs), 100, lowercase=True)
    assert "Hello" in cased.encode("Hello").tokens and "hello" in uncased.encode("Hello").tokens
    assert tokenizer_hash(cased) != tokenizer_hash(uncased)


def test_cjk_characters_are_split():
    tok = train_wordpiece(lambda: iter(ZH_DOCS * 3), 400, lowercase=True)
    assert tok.encode("自然语言", add_special_tokens=False).tokens == ["自", "然", "语", "言"]


def test_directory_loads_in_transformers_with_identical_ids(tokenizer_dir):
    from transformers import BertTokenizerFast

    tok, info = load_tokenizer_dir(tokenizer_dir)
    hf = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    text = "Emma Woodhouse, handsome, clever, and rich; 北京 naïve."
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.mask_token_id == info.mask_id and hf.do_lower_case
    assert (tokenizer_dir / "vocab.txt").read_text().split("\n")[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)


def test_import_vocab_txt_and_tokenizer_json(tokenizer_dir, tmp_path):
    original = read_tokenizer(tokenizer_dir)
    from_txt = read_tokenizer(tokenizer_dir / "vocab.txt")
    from_json = read_tokenizer(tokenizer_dir / "tokenizer.json")
    assert tokenizer_hash(from_json) == tokenizer_hash(original)
    assert from_txt.encode("a clever reply").ids == original.encode("a clever reply").ids
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    assert tokenizer_info(read_tokenizer(bare / "vocab.txt")).lowercase  # uncased unless declared
    assert not tokenizer_info(read_tokenizer(bare / "vocab.txt", lowercase=False)).lowercase
    save_tokenizer_dir(from_txt, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "vocab_info.json").read_text())["sha256"] == tokenizer_hash(from_txt)


def test_tokenizer_hash_of_a_path_equals_hash_of_the_object(tokenizer_dir):
    assert tokenizer_hash(str(tokenizer_dir)) == tokenizer_hash(read_tokenizer(tokenizer_dir))


def test_bad_tokenizers_are_refused(tmp_path):
    with pytest.raises(PrepError, match="tokenizer not found"):
        read_tokenizer(tmp_path / "missing")
    with pytest.raises(PrepError, match="holds neither tokenizer.json nor vocab.txt"):
        read_tokenizer(tmp_path)
    v = tmp_path / "vocab.txt"
    v.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(PrepError, match=r"lacks the special tokens \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        read_tokenizer(v)
    v.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n")
    with pytest.raises(PrepError, match=r"vocab.txt:7: token 'hello' repeats line 6"):
        read_tokenizer(v)
    j = tmp_path / "tokenizer.json"
    j.write_text("{not json")
    with pytest.raises(PrepError, match="not a valid tokenizers JSON"):
        read_tokenizer(j)
