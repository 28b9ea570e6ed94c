"""The configuration of a data_prep run: one tree of documented dataclasses on the config engine
(``data_prep.settings``, shared with pretrain).

``python -m data_prep run --config FILE.yaml`` reads a YAML with the sections below (a file may
extend another with ``base:``); flags and ``section.key=value`` arguments override it.  Every
problem is collected and reported at once, each with its key and, for a misspelt key, the closest
valid one.  Relative paths are relative to the current directory, in a file as on the command line
(docs/configuration.md says why).  The ``input`` and ``clean`` sections are the options of their
stages (``readers.ReadOptions``, ``clean.CleanOptions``), declared there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from data_prep import settings
from data_prep.clean import CleanOptions
from data_prep.errors import ON_ERROR_CHOICES, PrepError
from data_prep.readers import ReadOptions
from data_prep.settings import ConfigError, ConfigFileError, setting

# Choices are tuples, used as field types too: Literal[OBJECTIVES] is Literal["nsp", "sop", "full-sentences", "blocks"].
OBJECTIVES = ("nsp", "sop", "full-sentences", "blocks")
MASKING_MODES = ("static", "dynamic")
VOCAB_MODELS = ("wordpiece", "bpe")
# 4x the largest vocabularies in use (XLM-R 250,002, mT5 250,112, Gemma 262,144); the WordPiece
# trainer allocates for vocab_size up front (2**31 asked it for 141 GB and aborted).
MAX_VOCAB_SIZE = 1 << 20


@dataclass(frozen=True)
class InputConfig(ReadOptions):
    paths: list[str] = setting(factory=list, path=True, flags="--input")
    """Input files, directories (recursive, sorted, dotfiles skipped) and globs, read in this order."""


@dataclass
class VocabConfig:
    tokenizer: Optional[str] = setting(None, path=True, flags="--from")
    """An existing tokenizer directory, tokenizer.json or vocab.txt to use (WordPiece or RoBERTa's BPE);
    null trains a vocabulary of ``vocab.model`` on the input."""
    model: Literal[VOCAB_MODELS] = setting("wordpiece", flags="--model")
    """Vocabulary to train: ``wordpiece`` (BERT: [PAD] [UNK] [CLS] [SEP] [MASK], ## continuations) or ``bpe``
    (RoBERTa's byte-level BPE, cased: <s> <pad> </s> <unk> at ids 0-3, <mask> last; samples framed
    <s> A </s></s> B </s>)."""
    vocab_size: int = setting(30522, ge=16, le=MAX_VOCAB_SIZE)
    """Vocabulary size to train."""
    lowercase: Optional[bool] = setting(None, flags={"--uncased": True, "--cased": False})
    """Lowercase the text (WordPiece only).  null: uncased when training WordPiece (BPE is cased); when
    importing a bare vocab.txt, its tokenizer_config.json's do_lower_case if present, else uncased."""
    min_frequency: int = setting(2, ge=1)
    """Least count of a merged word piece."""
    max_text_mb: Optional[float] = setting(None, ge=0.001)
    """Train on at most this many MB of cleaned text (null: all of it)."""


@dataclass
class ShardsConfig:
    seq_len: int = setting(128, ge=8, le=65535)
    """Tokens per sample including [CLS]/[SEP]."""
    objective: Literal[OBJECTIVES] = "nsp"
    """Sentence objective: next-sentence pairs, sentence-order pairs, full sentences (RoBERTa) or full rows (blocks)."""
    masking: Literal[MASKING_MODES] = "dynamic"
    """``static``: masks written into the shards; ``dynamic``: the training loader masks each epoch."""
    whole_word_mask: bool = False
    """Mask whole words (## pieces; jieba words for Chinese)."""
    dupe_factor: int = setting(1, ge=1, le=1000)
    """Passes over the data, each with new instances and masks."""
    max_predictions: int = setting(20, ge=1, le=65535)
    """Most masked tokens per sample."""
    masked_lm_prob: float = setting(0.15, ge=0.001, le=0.999)
    """Fraction of tokens masked."""
    short_seq_prob: float = setting(0.1, ge=0.0, le=1.0)
    """nsp/sop: chance of a shorter target length."""
    val_fraction: float = setting(0.01, ge=0.0, le=0.999)
    """Fraction of documents held out in val-*.tar."""
    text_per_shard_mb: Optional[float] = setting(None, ge=0.0001)
    """MB of cleaned text per work unit, i.e. per shard (before duplication).  null: picked from the
    input's size (16 train units, within 1 to 4 MB; compressed files count 3x their size), so that a
    small corpus still spreads over the workers."""


@dataclass
class PrepConfig:
    out: str = setting("", path=True)
    """Output directory: ``run`` writes <out>/tokenizer and <out>/shards; ``shards`` writes the shards
    into it."""
    seed: int = setting(12345, ge=0)
    """Random seed of splitting, instances and masks."""
    workers: int = setting(1, ge=1, le=1024)
    """Worker processes."""
    on_error: Literal[ON_ERROR_CHOICES] = "stop"
    """Bad input: ``skip`` (and count) it, or ``stop``."""
    num_nodes: int = setting(1, ge=1)
    """Nodes sharing the work (default: the SLURM array size, else 1)."""
    node_rank: int = setting(0, ge=0)
    """This node's rank (default: the SLURM array task, else 0)."""
    progress: bool = True
    """Show progress: a bar on a terminal; off one (a log file), a plain line on stderr every 30 s as
    shards finish."""
    input: InputConfig = setting(factory=InputConfig)
    clean: CleanOptions = setting(factory=CleanOptions)
    vocab: VocabConfig = setting(factory=VocabConfig)
    shards: ShardsConfig = setting(factory=ShardsConfig)


# {dotted key: (lowest, highest)} allowed, inclusive (None: unbounded), of every bounded key
RANGES = {k: (key.bounds.get("ge"), key.bounds.get("le")) for k, key in settings.keys(PrepConfig).items()
          if key.bounds}
RULES = settings.Rules()


@RULES.check("shards.max_predictions", "shards.seq_len")
def _predictions_fit(cfg: PrepConfig):
    s = cfg.shards
    if s.max_predictions > s.seq_len:
        return f"shards.max_predictions: got {s.max_predictions}, expected <= shards.seq_len ({s.seq_len})"


@RULES.check("vocab.lowercase", "vocab.model")
def _bpe_is_cased(cfg: PrepConfig):
    v = cfg.vocab
    if v.model == "bpe" and v.lowercase and not v.tokenizer:
        return ("vocab.lowercase: got true, expected null or false with vocab.model=bpe (byte-level BPE keeps "
                "the text as it is, as RoBERTa does)")


@RULES.check("node_rank", "num_nodes")
def _rank_in_nodes(cfg: PrepConfig):
    if cfg.node_rank >= cfg.num_nodes:
        return f"node_rank: got {cfg.node_rank}, expected < num_nodes ({cfg.num_nodes})"


def load_config(path=None, flags: dict | None = None, overrides: list[str] | None = None,
                environment: dict | None = None) -> PrepConfig:
    """defaults < ``environment`` < YAML file ``path`` (with its bases) < ``flags`` < ``overrides``
    (``section.key=value``); ``environment`` and ``flags`` are {dotted key: value}.  Raises PrepError
    listing every problem."""
    try:
        data = settings.merge(settings.unflatten(environment or {}), settings.read_file(path) if path else {})
        data = settings.merge(data, settings.unflatten(flags or {}))
        if overrides:
            data = settings.merge(data, settings.parse_overrides(overrides, "shards.seq_len=512"))
    except (ConfigError, ConfigFileError) as err:
        raise PrepError(str(err)) from None
    return _build(data, str(path) if path else "the command line")


def _build(data: dict, source: str) -> PrepConfig:
    try:  # settings are fingerprinted as given: an int in a float field stays an int (4, not 4.0)
        return settings.build(PrepConfig, data, source=source, rules=RULES, widen_ints=False)
    except ConfigError as err:
        raise PrepError(str(err)) from None


def slurm_node_slice(environ=os.environ) -> tuple[int, int] | None:
    """(num_nodes, node_rank) from a SLURM job array, or None outside one."""
    count, task = environ.get("SLURM_ARRAY_TASK_COUNT"), environ.get("SLURM_ARRAY_TASK_ID")
    if not count or task is None:
        return None
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(count), int(task) - first
