"""The configuration of a data_prep run: YAML sections mapped onto dataclasses, validated in one go.

``python -m data_prep run --config FILE.yaml`` reads a YAML with the sections below; command-line
flags override it (``CLI_OPTIONS`` maps each flag to its key).  Every problem is collected and
reported at once, each with its key and, for a misspelt key, the closest valid one.

Relative paths inside a YAML file (``out``, ``input.paths``, ``vocab.tokenizer``) are resolved
against the directory of that YAML file; relative paths given on the command line are resolved
against the current directory.
"""
from __future__ import annotations

import difflib
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path


from data_prep.errors import ON_ERROR_CHOICES, PrepError
from data_prep.readers import DOC_SEPARATORS, FORMATS
from data_prep.settings import NOT_A_NUMBER, ConfigFileError, finite_number, read_yaml_mapping

OBJECTIVES = ("nsp", "sop", "full-sentences")
MASKING_MODES = ("static", "dynamic")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # files, directories, globs
    format: str = "auto"  # auto | text | jsonl | wikiextractor | mediawiki
    doc_separator: str = "line"  # text format: one document per line, or "blank"-line separated
    jsonl_field: str = "text"
    max_line_bytes: int = 16 << 20


@dataclass
class CleanConfig:
    unicode_form: str = "NFKC"
    strip_markup: bool = True
    min_doc_chars: int = 20
    dedup: bool = True


@dataclass
class VocabConfig:
    tokenizer: str | None = None  # an existing tokenizer dir / tokenizer.json / vocab.txt; None: train
    vocab_size: int = 30522
    lowercase: bool | None = None  # None: uncased when training; when importing a bare vocab.txt, its
    #   tokenizer_config.json's do_lower_case if present, else uncased
    min_frequency: int = 2
    max_text_mb: float | None = None  # train on at most this much cleaned text (None: all of it)


@dataclass
class ShardsConfig:
    seq_len: int = 128
    objective: str = "nsp"  # nsp | sop | full-sentences
    masking: str = "dynamic"  # static | dynamic
    whole_word_mask: bool = False
    dupe_factor: int = 1
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    val_fraction: float = 0.01
    text_per_shard_mb: float = 4.0  # cleaned text per work unit = per shard (before duplication)


@dataclass
class PrepConfig:
    out: str = ""  # run: <out>/tokenizer and <out>/shards; shards command: the shard directory
    seed: int = 12345
    workers: int = 1
    on_error: str = "stop"  # stop | skip
    num_nodes: int = 1
    node_rank: int = 0
    progress: bool = True
    input: InputConfig = field(default_factory=InputConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


PATH_KEYS = ("out", "input.paths", "vocab.tokenizer")
CHOICES = {
    "on_error": ON_ERROR_CHOICES, "input.format": FORMATS, "input.doc_separator": DOC_SEPARATORS,
    "clean.unicode_form": UNICODE_FORMS, "shards.objective": OBJECTIVES, "shards.masking": MASKING_MODES,
}
# 4x the largest vocabularies in use (XLM-R 250,002, mT5 250,112, Gemma 262,144); the WordPiece
# trainer allocates for vocab_size up front (2**31 asked it for 141 GB and aborted).
MAX_VOCAB_SIZE = 1 << 20
# key: (lowest, highest) allowed, inclusive; None = unbounded
RANGES = {
    "seed": (0, None), "workers": (1, 1024), "num_nodes": (1, None), "node_rank": (0, None),
    "input.max_line_bytes": (1024, None), "clean.min_doc_chars": (0, None),
    "vocab.vocab_size": (16, MAX_VOCAB_SIZE), "vocab.min_frequency": (1, None), "vocab.max_text_mb": (0.001, None),
    "shards.seq_len": (8, 65535), "shards.dupe_factor": (1, 1000), "shards.max_predictions": (1, 65535),
    "shards.masked_lm_prob": (0.001, 0.999), "shards.short_seq_prob": (0.0, 1.0),
    "shards.val_fraction": (0.0, 0.999), "shards.text_per_shard_mb": (0.0001, None),
}

# (flag, key, help) for the flags both `shards` and `run` accept.
CLI_OPTIONS = [
    ("--input", "input.paths", "input files, directories or globs"),
    ("--format", "input.format", f"input format: {', '.join(FORMATS)}"),
    ("--doc-separator", "input.doc_separator", "text format: one document per 'line' or 'blank'-line separated"),
    ("--jsonl-field", "input.jsonl_field", "JSONL field holding the text"),
    ("--max-line-bytes", "input.max_line_bytes", "longer lines are bad input"),
    ("--unicode-form", "clean.unicode_form", f"Unicode normalization: {', '.join(UNICODE_FORMS)}"),
    ("--min-doc-chars", "clean.min_doc_chars", "drop shorter documents (after cleaning)"),
    ("--no-dedup", "clean.dedup", "keep duplicate documents"),
    ("--seq-len", "shards.seq_len", "tokens per sample including [CLS]/[SEP]"),
    ("--objective", "shards.objective", "nsp | sop | full-sentences"),
    ("--masking", "shards.masking", "static (precomputed) | dynamic (the loader masks)"),
    ("--whole-word-mask", "shards.whole_word_mask", "mask whole words (## pieces; jieba words for Chinese)"),
    ("--dupe-factor", "shards.dupe_factor", "passes over the data, each with new instances and masks"),
    ("--max-predictions", "shards.max_predictions", "most masked tokens per sample"),
    ("--masked-lm-prob", "shards.masked_lm_prob", "fraction of tokens masked"),
    ("--short-seq-prob", "shards.short_seq_prob", "nsp/sop: chance of a shorter target length"),
    ("--val-fraction", "shards.val_fraction", "fraction of documents held out in val-*.tar"),
    ("--text-per-shard-mb", "shards.text_per_shard_mb", "MB of cleaned text per shard (before duplication)"),
    ("--workers", "workers", "worker processes"),
    ("--seed", "seed", "random seed"),
    ("--on-error", "on_error", "bad input: skip (and count) or stop"),
    ("--num-nodes", "num_nodes", "nodes sharing the work (default: SLURM array size, else 1)"),
    ("--node-rank", "node_rank", "this node's rank (default: SLURM array task, else 0)"),
]


def section_keys(cls=PrepConfig, prefix: str = "") -> dict[str, type]:
    """Every valid dotted key with its annotated type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        key = prefix + f.name
        if is_dataclass(hints[f.name]):
            out.update(section_keys(hints[f.name], key + "."))
        else:
            out[key] = hints[f.name]
    return out


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if not close and "." in key:
        leaf = key.rsplit(".", 1)[1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1] or \
            difflib.get_close_matches(leaf, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(key: str, value, expected) -> tuple[object, str | None]:
    """(value as stored, None) when ``value`` fits annotation ``expected``, else (value, problem)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return value, None
        expected = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is list:
        if isinstance(value, str):
            return value, None  # a single path is fine; normalised to a list
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return value, f"{key}: got {value!r}, expected a list of strings"
        return value, None
    if expected is float:
        return _check_float(key, value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(expected, True)
    return value, None if ok else f"{key}: got {value!r}, expected {expected.__name__}"


def _check_float(key: str, value) -> tuple[object, str | None]:
    """A float field takes what finite_number accepts (an int stays an int: settings are fingerprinted
    as given)."""
    value, problem = finite_number(value)
    if problem == NOT_A_NUMBER:
        return value, f"{key}: got {value!r}, expected float"
    if problem is None:
        return value, None
    lo, hi = RANGES.get(key, (None, None))
    where = f" {_range_words(lo, hi)}" if (lo, hi) != (None, None) else ""
    return value, f"{key}: got {value!r}, expected a finite number{where}"


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in ("input", "clean", "vocab", "shards"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_from_flat(flat: dict, source: str = "config") -> PrepConfig:
    """Validate dotted keys -> PrepConfig; raises PrepError listing every problem."""
    valid = section_keys()
    problems, checked = [], {}
    for key, value in flat.items():
        if key not in valid:
            problems.append(f"{key}: unknown key{_suggest(key, valid)}")
            continue
        value, err = _check_type(key, value, valid[key])
        checked[key] = value
        if err:
            problems.append(err)
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: got {value!r}, expected one of {', '.join(map(str, CHOICES[key]))}")
        elif key in RANGES and value is not None:
            lo, hi = RANGES[key]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                problems.append(f"{key}: got {value!r}, expected {_range_words(lo, hi)}")
    cfg = PrepConfig()
    if not problems:
        for key, value in checked.items():
            obj, leaf = cfg, key
            if "." in key:
                section, leaf = key.split(".", 1)
                obj = getattr(cfg, section)
            if key == "input.paths" and isinstance(value, str):
                value = [value]
            setattr(obj, leaf, value)
        problems = cross_check(cfg)
    if problems:
        raise PrepError(f"{len(problems)} configuration problem(s) in {source}:\n" +
                        "\n".join(f"  - {p}" for p in problems))
    return cfg


def _range_words(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"between {lo} and {hi}"


def cross_check(cfg: PrepConfig) -> list[str]:
    problems = []
    s = cfg.shards
    if s.max_predictions > s.seq_len:
        problems.append(f"shards.max_predictions: got {s.max_predictions}, expected <= shards.seq_len ({s.seq_len})")
    if cfg.node_rank >= cfg.num_nodes:
        problems.append(f"node_rank: got {cfg.node_rank}, expected < num_nodes ({cfg.num_nodes})")
    return problems


def load_yaml(path) -> dict:
    """A data_prep YAML as dotted keys, relative paths resolved against the file's directory."""
    path = Path(path)
    try:
        raw = read_yaml_mapping(path)
    except ConfigFileError as err:
        raise PrepError(str(err)) from None
    flat = _flatten(raw)
    base = path.resolve().parent
    for key in PATH_KEYS:  # relative to the YAML file's directory
        value = flat.get(key)
        if isinstance(value, str):
            flat[key] = _resolve(base, value) if key != "input.paths" else [_resolve(base, value)]
        elif isinstance(value, list):
            flat[key] = [_resolve(base, v) if isinstance(v, str) else v for v in value]
    return flat


def _resolve(base: Path, value: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(str(base / value))


def slurm_node_slice(environ=os.environ) -> tuple[int, int] | None:
    """(num_nodes, node_rank) from a SLURM job array, or None outside one."""
    count, task = environ.get("SLURM_ARRAY_TASK_COUNT"), environ.get("SLURM_ARRAY_TASK_ID")
    if not count or task is None:
        return None
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(count), int(task) - first


def to_dict(cfg: PrepConfig) -> dict:
    return asdict(cfg)
