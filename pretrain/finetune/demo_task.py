"""A small labelled task cut from a plain-text corpus: the demo's fine-tuning step and the tests' data.

"Does this passage name WORD?": the corpus's words in passages of ``size`` words, half of them holding
WORD (any case, punctuation stripped), half not, alternating.  A model learns it from a few hundred
examples in seconds, so it shows the plumbing works end to end (files, tokenizer, head, training,
metrics, export); it says nothing of language understanding.
"""
from __future__ import annotations

import gzip
import json
import os
import string


def read_words(corpus: str, lines: int = 1500) -> list[str]:
    """The whitespace-separated words of the first ``lines`` lines of a text file (gzip by suffix)."""
    opener = gzip.open if corpus.endswith(".gz") else open
    with opener(corpus, "rt", encoding="utf-8") as f:
        return " ".join(line.strip() for _, line in zip(range(lines), f)).split()


def bare(word: str) -> str:
    """The word lowercased, punctuation (and Gutenberg's _italics_ marks) stripped from its ends."""
    return word.strip(string.punctuation + "_").lower()


def windows(words: list[str], size: int) -> list[list[str]]:
    """Consecutive, non-overlapping passages of ``size`` words (a short tail dropped)."""
    return [words[i:i + size] for i in range(0, len(words) - size, size)]


def mention_rows(words: list[str], word: str, count: int, size: int = 10) -> list[dict]:
    """``count`` rows {"text", "label": "yes"|"no"}: passages naming ``word`` and not, alternating."""
    passages = windows(words, size)
    pos = [p for p in passages if any(bare(x) == word for x in p)]
    neg = [p for p in passages if not any(bare(x) == word for x in p)]
    half = (count + 1) // 2
    if len(pos) < half or len(neg) < half:
        raise ValueError(f"the corpus has {len(pos)} passages of {size} words naming {word!r} and {len(neg)} "
                         f"without: {half} of each needed")
    rows = [r for p, n in zip(pos[:half], neg[:half])
            for r in ({"text": " ".join(p), "label": "yes"}, {"text": " ".join(n), "label": "no"})]
    return rows[:count]


def write_splits(out_dir: str, splits: dict[str, list[dict]]) -> list[str]:
    """OUT_DIR/NAME.jsonl for each split's rows (written atomically); returns their paths in order."""
    from pretrain.weights import atomic_write_text
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in splits.items():
        paths.append(os.path.join(out_dir, f"{name}.jsonl"))
        atomic_write_text(paths[-1], "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def write_mention_task(words: list[str], out_dir: str, word: str = "emma", n_train: int = 320,
                       n_dev: int = 80) -> tuple[str, str]:
    """OUT_DIR/train.jsonl and OUT_DIR/dev.jsonl of the mention task; returns their paths."""
    rows = mention_rows(words, word, n_train + n_dev)
    train, dev = write_splits(out_dir, {"train": rows[:n_train], "dev": rows[n_train:]})
    return train, dev
