"""Stage 4, vocabulary: train a BERT WordPiece or a RoBERTa byte-level BPE tokenizer, or import an
existing vocab.txt/tokenizer.json.

A tokenizer directory holds ``tokenizer.json`` (HF tokenizers), ``vocab.txt`` (the tokens by id: the
WordPiece vocabulary the model export copies; for BPE a listing only, the export writes vocab.json and
merges.txt from tokenizer.json), ``tokenizer_config.json`` + ``special_tokens_map.json`` (so
transformers' BertTokenizerFast / RobertaTokenizerFast loads it) and ``vocab_info.json`` (hash, size,
case, model, special ids; written last: its presence marks the directory complete).  The tokenizer
hash is the sha256 of its serialization (see tokenizer_hash).

BPE is RoBERTa's (GPT-2's byte-level BPE): no normalizer, ``ByteLevel(add_prefix_space=False)``,
``<s>`` ``<pad>`` ``</s>`` ``<unk>`` at ids 0-3 and ``<mask>`` last, ``<s> A </s></s> B </s>``.
Its trainer is deterministic as it is (merges are picked by count, ties by the pair's ids).

HF's WordPiece trainer assigns ids to ``##x`` tokens in hash-map order, which makes the vocabulary
differ between runs (huggingface/tokenizers#1794).  We pre-register every ``##x`` the corpus can
produce, in sorted order, so training is a pure function of the text and the settings.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import string
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from data_prep.errors import PrepError, write_error
from data_prep.fsutil import atomic_write_json, atomic_write_text, sha256_text, temp_path_for

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's, in its id order
# tokenizers model type -> (pad, unk, cls, sep, mask) token: the roles TokenizerInfo names
SPECIAL_ROLES = {"WordPiece": SPECIAL_TOKENS, "BPE": ("<pad>", "<unk>", "<s>", "</s>", "<mask>")}
INFO_FILE = "vocab_info.json"
# The files save_tokenizer_dir writes (INFO_FILE last).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", INFO_FILE)
TOKENIZER_FORMAT = "bertforge-tokenizer/1"
# Ranges BertNormalizer(handle_chinese_chars=True) surrounds with spaces: never inside a word.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@dataclass(frozen=True)
class TokenizerInfo:
    sha256: str
    vocab_size: int
    lowercase: bool
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    model: str = "WordPiece"  # tokenizers model type: WordPiece (BERT) or BPE (RoBERTa)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    @property
    def token_dtype(self) -> str:
        """Smallest numpy dtype that holds every token id (shards store input ids in it)."""
        return "uint16" if self.vocab_size <= 1 << 16 else "int32"


CJK_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES) + "]")


def is_cjk_char(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def build_bert_tokenizer(vocab: dict[str, int], lowercase: bool):
    """A BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, [CLS] A [SEP] B [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise PrepError(f"vocabulary lacks the special tokens {missing}; expected all of {list(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_roberta_tokenizer(vocab: dict[str, int], merges: list):
    """A RoBERTa byte-level BPE tokenizer of ``vocab`` (holding the five special tokens) and ``merges``
    (pairs of tokens, or "a b" strings as merges.txt has them), as transformers' RobertaTokenizerFast
    builds one: ByteLevel(add_prefix_space=False), RobertaProcessing, ``<mask>`` stripping the space before it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    missing = [t for t in BPE_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise PrepError(f"vocabulary lacks the special tokens {missing}; expected all of {list(BPE_SPECIAL_TOKENS)}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]),
                                                      trim_offsets=True, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*BPE_SPECIAL_TOKENS[:4], AddedToken("<mask>", lstrip=True, normalized=False)])
    return tok


def train_bpe(texts: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int = 2):
    """Train RoBERTa's byte-level BPE on ``texts()`` (one pass): ``vocab_size`` tokens counting the 256
    byte symbols and the special tokens, ``<s> <pad> </s> <unk>`` first and ``<mask>`` last."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  special_tokens=list(BPE_SPECIAL_TOKENS[:4]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chars = 0

    def counted():
        nonlocal chars
        for text in texts():
            chars += len(text)
            yield text
    raw.train_from_iterator(counted(), trainer)
    if not chars:
        raise PrepError("no text to train the vocabulary on (all input was empty or dropped)")
    model = json.loads(raw.to_str())["model"]
    vocab = dict(model["vocab"], **{"<mask>": len(model["vocab"])})
    if len(vocab) < vocab_size:
        print(f"data_prep vocab: warning: vocab_size {vocab_size:,} is more than this corpus can fill; the "
              f"vocabulary has {len(vocab):,} tokens", file=sys.stderr)
    return build_roberta_tokenizer(vocab, model["merges"])


def _may_continue_a_word(ch: str) -> bool:
    # BertPreTokenizer splits on whitespace and punctuation; CJK characters are isolated by the
    # normalizer.  Every other character can appear inside a word, so may need a "##ch" token.
    if ch.isspace() or ch in string.punctuation or is_cjk_char(ch):
        return False
    return not unicodedata.category(ch).startswith("P")


class _MergeBound:
    """An upper bound of the merges WordPiece training can make, counted until it reaches ``enough``.

    A merge joins two pieces of a distinct word, so a word of n characters allows at most n - 1.
    Words are split at whitespace only: a whitespace-separated token holds one or more of the
    pre-tokenizer's words, so its length - 1 bounds theirs together.  At most ``enough`` tokens are
    kept, since each one adds at least 1."""

    def __init__(self, enough: int):
        self.enough, self.count, self.seen = enough, 0, set()

    def add(self, text: str) -> None:
        if self.count >= self.enough:
            return
        for token in text.split():
            if len(token) > 1 and token not in self.seen:
                self.seen.add(token)
                self.count += len(token) - 1


def train_wordpiece(texts: Callable[[], Iterable[str]], vocab_size: int, lowercase: bool,
                    min_frequency: int = 2):
    """Train on ``texts()`` (called twice: once for the alphabet, once for training).  Warns before
    training when ``vocab_size`` is more than the corpus can fill (the vocabulary comes out smaller)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None, lowercase=lowercase)
    chars: set[str] = set()
    merges = _MergeBound(vocab_size)
    for text in texts():
        text = normalizer.normalize_str(text)
        chars.update(text)
        merges.add(text)
    if not chars:
        raise PrepError("no text to train the vocabulary on (all input was empty or dropped)")
    continuations = ["##" + ch for ch in sorted(chars) if _may_continue_a_word(ch)]
    fillable = len(SPECIAL_TOKENS) + len(continuations) + len(chars) + merges.count
    if vocab_size > fillable:
        print(f"data_prep vocab: warning: vocab_size {vocab_size:,} is more than this corpus can fill (at most "
              f"{fillable:,} tokens: {len(chars):,} characters, their ## forms, the special tokens and at most "
              f"{merges.count:,} merges); the vocabulary will be smaller", file=sys.stderr)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS) + continuations,
                                        continuing_subword_prefix="##", show_progress=False)
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(texts(), trainer)
    # Rebuild: the pre-registered "##x" become ordinary vocabulary entries, not special tokens.
    return build_bert_tokenizer(raw.get_vocab(), lowercase)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's serialization (``Tokenizer.to_str()``: compact JSON, fixed field order,
    vocabulary by id), so the hash depends on what the tokenizer does, not on how its file is
    formatted.  ``tokenizer`` is a Tokenizer or a path read_tokenizer takes."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = read_tokenizer(Path(tokenizer))
    return sha256_text(tokenizer.to_str())


def tokenizer_model(tokenizer) -> str:
    """The tokenizers model type (WordPiece, BPE, ...) of a Tokenizer."""
    return type(tokenizer.model).__name__


def special_token_ids(tokenizer) -> dict[str, int]:
    """{pad, unk, cls, sep, mask: id} of a WordPiece (``[PAD]``...) or BPE (``<pad>``...) tokenizer;
    a one-line PrepError for another model or a missing special token."""
    model = tokenizer_model(tokenizer)
    tokens = SPECIAL_ROLES.get(model)
    if tokens is None:
        raise PrepError(f"tokenizer model type is {model!r}; expected one of {', '.join(SPECIAL_ROLES)}")
    ids = {t: tokenizer.token_to_id(t) for t in tokens}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise PrepError(f"{model} tokenizer lacks the special tokens {missing}; expected all of {list(tokens)}")
    return dict(zip(("pad", "unk", "cls", "sep", "mask"), ids.values()))


def tokenizer_info(tokenizer) -> TokenizerInfo:
    lowercase = bool(normalizer_flags(json.loads(tokenizer.to_str()).get("normalizer"))[0])
    ids = special_token_ids(tokenizer)
    return TokenizerInfo(sha256=tokenizer_hash(tokenizer), vocab_size=tokenizer.get_vocab_size(),
                         lowercase=lowercase, pad_id=ids["pad"], unk_id=ids["unk"], cls_id=ids["cls"],
                         sep_id=ids["sep"], mask_id=ids["mask"], model=tokenizer_model(tokenizer))


def normalizer_flags(normalizer: dict | None) -> tuple[bool | None, bool | None]:
    """(lowercase, strip_accents) of a tokenizer.json ``normalizer`` entry, Sequences searched
    recursively (accents are stripped when any member strips them); (None, None) when there is none.
    strip_accents is None where the normalizer leaves it to lowercasing (BertNormalizer's rule)."""
    if not normalizer:
        return None, None
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase")), normalizer.get("strip_accents")
    if kind == "Lowercase":
        return True, None
    if kind == "StripAccents":
        return False, True
    if kind == "Sequence":
        flags = [normalizer_flags(n) for n in normalizer.get("normalizers", [])]
        strips = [s for _, s in flags if s is not None]
        return any(lc for lc, _ in flags), (any(strips) if strips else None)
    return False, None


def save_tokenizer_dir(tokenizer, out_dir: Path, extra: dict | None = None,
                       info: TokenizerInfo | None = None) -> TokenizerInfo:
    """Write the tokenizer directory (see module doc); vocab_info.json last, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = info or tokenizer_info(tokenizer)
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise PrepError("tokenizer ids are not contiguous 0..N-1; cannot write vocab.txt")
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str())
    atomic_write_text(out_dir / "vocab.txt", "".join(t + "\n" for t, _ in by_id))
    specials = special_tokens_map(info.model)
    if info.model == "BPE":
        settings = {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": False, "trim_offsets": True}
    else:
        settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": info.lowercase,
                    "tokenize_chinese_chars": True, "strip_accents": None}
    atomic_write_json(out_dir / "tokenizer_config.json", {**settings, "model_max_length": 512, **specials})
    atomic_write_json(out_dir / "special_tokens_map.json", specials)
    atomic_write_json(out_dir / INFO_FILE, {"format": TOKENIZER_FORMAT, **asdict(info), **(extra or {})})
    return info


def special_tokens_map(model: str) -> dict[str, str]:
    """transformers' special_tokens_map of a WordPiece (BERT) or BPE (RoBERTa) tokenizer."""
    roles = dict(zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_ROLES[model]))
    names = {"unk_token": roles["unk"], "sep_token": roles["sep"], "pad_token": roles["pad"],
             "cls_token": roles["cls"], "mask_token": roles["mask"]}
    return names | ({"bos_token": roles["cls"], "eos_token": roles["sep"]} if model == "BPE" else {})


def install_tokenizer_dir(tokenizer, out_dir: Path, info: TokenizerInfo) -> None:
    """Write a new tokenizer directory under a temp name and rename it into place, so that another
    process (a node of the same multi-node run) never sees it half written.  Where one installed it
    first, theirs is kept when it holds the same tokenizer."""
    out_dir = Path(out_dir)
    tmp = temp_path_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer_dir(tokenizer, tmp, info=info)
    try:
        os.rename(tmp, out_dir)
        return
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise write_error(out_dir, err) from None
    theirs = tokenizer_hash(read_tokenizer(out_dir, validate=False))
    if theirs != info.sha256:
        raise PrepError(f"{out_dir}: written meanwhile by another process with tokenizer {theirs[:12]}..., but "
                        f"this run's tokenizer is {info.sha256[:12]}... (mismatched tokenizer)")


def read_vocab_txt(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise PrepError(f"{path}: invalid UTF-8 at byte {err.start}; expected a vocab.txt (one token per line)")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, token in enumerate(lines, 1):
        token = token.rstrip("\r")
        if not token:
            raise PrepError(f"{path}:{lineno}: empty token; expected one token per line")
        if token in vocab:
            raise PrepError(f"{path}:{lineno}: token {token!r} repeats line {vocab[token] + 1}")
        vocab[token] = lineno - 1
    if not vocab:
        raise PrepError(f"{path}: empty vocabulary file")
    return vocab


def read_tokenizer(path: Path, lowercase: bool | None = None, validate: bool = True):
    """Load a tokenizer from a directory (tokenizer.json preferred, else vocab.txt) or either file.

    ``lowercase`` matters only for a bare vocab.txt: None takes ``do_lower_case`` from a
    tokenizer_config.json beside it, else True (uncased, like bert-base-uncased).  ``validate``
    checks a tokenizer.json's model type and special tokens (workers reading our own copy skip it).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "vocab.txt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise PrepError(f"tokenizer not found: {path} holds neither tokenizer.json nor vocab.txt "
                            "(make one with `python -m data_prep vocab`)")
        path = found
    elif not path.is_file():
        raise PrepError(f"tokenizer not found: {path} (expected a directory from `python -m data_prep vocab`, "
                        "a tokenizer.json or a vocab.txt)")
    if path.suffix == ".json":
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise PrepError(f"{path}: not a valid tokenizers JSON file ({err})") from err
        if not validate:
            return tok
        try:
            special_token_ids(tok)
        except PrepError as err:
            raise PrepError(f"{path}: {err}") from None
        return tok
    if lowercase is None:
        lowercase = declared_lowercase(path.parent)
    return build_bert_tokenizer(read_vocab_txt(path), lowercase)


def declared_lowercase(tokenizer_dir) -> bool:
    """``do_lower_case`` of the directory's tokenizer_config.json; True (BERT's default, uncased)
    where there is no such file, or it does not say (missing or null)."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not path.is_file():
        return True
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("do_lower_case")
    except (ValueError, AttributeError):
        raise PrepError(f"{path}: not a JSON object; expected a tokenizer_config.json") from None
    return True if value is None else bool(value)


def load_tokenizer_dir(path: Path):
    """(tokenizer, TokenizerInfo) of a directory written by save_tokenizer_dir."""
    tok = read_tokenizer(path)
    return tok, tokenizer_info(tok)
