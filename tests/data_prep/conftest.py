"""Fixtures of the data_prep tests: small tokenizers, small corpora, a helper that runs the shards stage.

Real corpora come from the root conftest's ``corpora_dir`` fixture (../shared/corpora), which skips
the test with a reason when they are absent; everything else uses the bundled demo corpus.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from data_prep.config import load_config
from data_prep.pipeline import build_shards
from data_prep.shards import iter_split_samples, read_manifest

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz"

# Short Chinese documents (written for these tests), one per line; they repeat a few multi-character
# words so that jieba's boundaries are easy to check.
ZH_DOCS = [
    "中华人民共和国成立于一九四九年。北京大学是一所著名的大学！自然语言处理是人工智能的一个重要方向。",
    "我们在北京大学学习自然语言处理。老师说：“今天的作业很简单。”同学们都很高兴。",
    "人工智能的发展非常迅速？很多公司都在研究自然语言处理。中华人民共和国的首都是北京。",
    "他每天早上跑步，然后去图书馆看书。图书馆里有很多关于人工智能的书。今天天气很好！",
    "上海是一个国际化的大都市。很多人在上海工作和生活。交通非常方便，地铁可以到达城市的每个角落。",
    "春天来了，公园里的花都开了。孩子们在草地上玩耍，老人们在树下聊天。这是一个美好的季节。",
]


def english_docs(n_chars: int = 200_000) -> list[str]:
    """The first paragraphs of the bundled demo corpus (always present)."""
    docs, size = [], 0
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                docs.append(line)
                size += len(line)
                if size >= n_chars:
                    break
    return docs


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def en_corpus(tmp_path_factory) -> Path:
    """~200 KB of English paragraphs, one per line."""
    return write_lines(tmp_path_factory.mktemp("corpus") / "en.txt", english_docs())


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An uncased 2,000-piece WordPiece vocabulary trained on the English test corpus."""
    from data_prep.vocab import save_tokenizer_dir, train_wordpiece

    docs = english_docs(300_000)
    out = tmp_path_factory.mktemp("tok_en")
    save_tokenizer_dir(train_wordpiece(lambda: iter(docs), 2000, lowercase=True), out)
    return out


@pytest.fixture(scope="session")
def zh_tokenizer_dir(tmp_path_factory) -> Path:
    from data_prep.vocab import save_tokenizer_dir, train_wordpiece

    out = tmp_path_factory.mktemp("tok_zh")
    save_tokenizer_dir(train_wordpiece(lambda: iter(ZH_DOCS * 3 + english_docs(20_000)), 800, lowercase=True), out)
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A 2,000-token RoBERTa byte-level BPE vocabulary trained on English and the Chinese documents."""
    from data_prep.vocab import save_tokenizer_dir, train_bpe

    out = tmp_path_factory.mktemp("tok_bpe")
    save_tokenizer_dir(train_bpe(lambda: iter(english_docs(200_000) + ZH_DOCS * 3), 2000), out)
    return out


def run_shards(inputs, tokenizer, out: Path, overwrite: bool = False, **flat):
    """The shards stage in this process with small defaults; returns the manifest."""
    settings = {"input.paths": [str(p) for p in inputs], "out": str(out), "progress": False,
                "shards.text_per_shard_mb": 0.05, "shards.val_fraction": 0.1, "seed": 7}
    settings.update({k.replace("__", "."): v for k, v in flat.items()})
    return build_shards(load_config(flags=settings), tokenizer, out, overwrite=overwrite)


def split_samples(out: Path, split: str = "train"):
    """The decoded samples of a split, in manifest order (``iter_split_samples``)."""
    return (sample for *_, sample in iter_split_samples(out, read_manifest(out), split))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
