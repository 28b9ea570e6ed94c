"""Vocabulary: deterministic training, import of vocab.txt / tokenizer.json, transformers compatibility."""
from __future__ import annotations

import json

import pytest

from data_prep.errors import PrepError
from data_prep.vocab import (SPECIAL_TOKENS, load_tokenizer_dir, read_tokenizer, save_tokenizer_dir,
                             tokenizer_hash, tokenizer_info, train_bpe, train_wordpiece)
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


# --------------------------------------------------------------------------------------------
# RoBERTa byte-level BPE
# --------------------------------------------------------------------------------------------
BPE_TRAIN = """
import json, sys
from data_prep.vocab import train_bpe
docs = json.load(open(sys.argv[1], encoding="utf-8"))
sys.stdout.write(train_bpe(lambda: iter(docs), 1200).to_str())
"""


def test_bpe_training_is_deterministic_with_roberta_special_ids(tmp_path):
    """Trained twice in this process and once in another (other hash seeds): the same bytes."""
    import subprocess
    import sys

    docs = english_docs(100_000) + ZH_DOCS * 3
    a = train_bpe(lambda: iter(docs), 1200)
    b = train_bpe(lambda: iter(docs), 1200)
    (tmp_path / "docs.json").write_text(json.dumps(docs), encoding="utf-8")
    other = subprocess.run([sys.executable, "-c", BPE_TRAIN, str(tmp_path / "docs.json")], check=True,
                           capture_output=True, text=True, encoding="utf-8").stdout
    assert a.to_str() == b.to_str() == other
    info = tokenizer_info(a)
    assert [a.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (info.cls_id, info.pad_id, info.sep_id, info.unk_id, info.mask_id) == (0, 1, 2, 3, 1199)
    assert info.vocab_size == 1200 and info.model == "BPE" and not info.lowercase
    assert a.encode("Hello").ids != a.encode("hello").ids  # cased: no normalizer


def real_lines(corpora_dir, name: str, n: int) -> list[str]:
    import gzip
    import itertools

    with gzip.open(corpora_dir / name, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n) if line.strip()]


def test_bpe_directory_and_export_encode_as_roberta_tokenizer(corpora_dir, tmp_path):
    """Our encoding == transformers' RobertaTokenizerFast loaded from the data_prep directory, from the
    exported model directory, and built by transformers from the exported vocab.json + merges.txt alone,
    on real English (technical prose) and Chinese text; pairs framed <s> A </s></s> B </s>."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, RobertaTokenizerFast

    from pretrain.hf import _tokenizer_spec, export_tokenizer

    train = real_lines(corpora_dir, "en_pydoc.txt.gz", 3000) + real_lines(corpora_dir, "zh_reviews.txt.gz", 1000)
    tok_dir, exported = tmp_path / "tok", tmp_path / "hf"
    save_tokenizer_dir(train_bpe(lambda: iter(train), 3000), tok_dir)
    exported.mkdir()
    export_tokenizer(str(tok_dir), str(exported), _tokenizer_spec(
        str(tok_dir), SimpleNamespace(arch="roberta", vocab_size=3000, max_position_embeddings=514)))
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    ours = read_tokenizer(tok_dir)
    bare = tmp_path / "bare"  # what transformers builds from vocab.json + merges.txt alone
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bare / name).write_bytes((exported / name).read_bytes())
    loaded = [AutoTokenizer.from_pretrained(str(tok_dir)), RobertaTokenizerFast.from_pretrained(str(exported)),
              RobertaTokenizerFast.from_pretrained(str(bare))]
    texts = (real_lines(corpora_dir, "en_pydoc.txt.gz", 4000)[3000:3200]
             + real_lines(corpora_dir, "zh_peoplesdaily1998.txt.gz", 200) + ["naïve café — “quotes” <mask> ok"])
    assert sum(not t.isascii() for t in texts) > 100
    expected = [e.ids for e in ours.encode_batch(texts)]
    for k, hf in enumerate(loaded):
        # transformers 5 builds the bare one's <mask> without lstrip (roberta-base's tokenizer.json has it)
        n = len(texts) - (k == 2)
        assert [hf(t)["input_ids"] for t in texts[:n]] == expected[:n]
        assert (hf.cls_token_id, hf.pad_token_id, hf.sep_token_id, hf.unk_token_id, hf.mask_token_id) == \
            (0, 1, 2, 3, 2999)
    a, b = ours.encode("first text", add_special_tokens=False).ids, ours.encode("second", add_special_tokens=False).ids
    pair = ours.encode("first text", "second").ids
    assert loaded[1]("first text", "second")["input_ids"] == [0, *a, 2, 2, *b, 2] == pair


def test_bpe_lowercase_is_refused_and_other_models_named():
    from data_prep.config import load_config

    with pytest.raises(PrepError, match="vocab.lowercase: got true, expected null or false with vocab.model=bpe"):
        load_config(flags={"vocab.model": "bpe", "vocab.lowercase": True})
    from tokenizers import Tokenizer, models

    with pytest.raises(PrepError, match="model type is 'Unigram'; expected one of WordPiece, BPE"):
        tokenizer_info(Tokenizer(models.Unigram()))
    with pytest.raises(PrepError, match="no text to train the vocabulary on"):
        train_bpe(lambda: iter(["", ""]), 400)
