"""The one typed configuration tree for pretraining.

Every setting lives here as a documented dataclass field.  Configs are loaded from YAML (safe
loading that refuses a key given twice and an empty file; an optional top-level ``base:`` names
another YAML, relative to the file, that this one extends), then ``section.key=value`` overrides
from the command line are applied.  Precedence: CLI > file (> its bases) > defaults.

Validation collects every problem (unknown keys with a close-match suggestion, wrong types,
values out of range, cross-field rules) and raises them together in one ``ConfigError``.

Of bertforge this module imports only data_prep's YAML file reader and its finite-number parsing
(one loader for both config engines; data_prep never imports pretrain); components receive only
their own section.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from data_prep.config import NOT_A_NUMBER, ConfigFileError, finite_number, read_yaml_mapping


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` lists them, ``str()`` shows them all."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: Literal["bert", "albert"] = "bert"
    """Model family.  ``albert`` enables the factorized embedding and the ALBERT export format."""
    vocab_size: int = 30522
    """Tokenizer vocabulary size (the exported size; padded internally, see pad_vocab_multiple)."""
    hidden_size: int = 768
    """Width H of the encoder."""
    num_layers: int = 12
    """Number of transformer layers L."""
    num_heads: int = 12
    """Attention heads; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer (4H for BERT)."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position table supports."""
    type_vocab_size: int = 2
    """Number of token-type (segment) embeddings."""
    embedding_size: Optional[int] = None
    """ALBERT factorized embedding size E (V x E + E x H); None means E = H (no projection)."""
    share_layers: bool = False
    """ALBERT cross-layer parameter sharing: one set of layer weights applied num_layers times."""
    layer_norm_position: Literal["post", "pre"] = "post"
    """``post``: LN after each residual add (original BERT); ``pre``: LN before each sublayer."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    hidden_act: Literal["gelu", "gelu_tanh"] = "gelu"
    """Feed-forward activation: exact erf GELU (BERT) or its tanh approximation (ALBERT's gelu_new)."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and sublayer outputs."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the normal initialization of weights (biases 0, LayerNorm 1/0)."""
    sentence_head: Literal["nsp", "sop", "none"] = "nsp"
    """Binary sentence-pair head: next-sentence (BERT), sentence-order (ALBERT) or none (RoBERTa)."""
    pad_vocab_multiple: int = 8
    """Pad the embedding/decoder rows to a multiple of this inside the model (never in exports)."""


@dataclass
class DataConfig:
    dir: str = ""
    """Directory written by ``data_prep shards`` (holds manifest.json, train-*.tar, val-*.tar)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory of the run; its hash must match the shards' (None: trust the manifest)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle_buffer: int = 131072
    """Size of the shuffle window of the global sample order: each epoch the shards are permuted,
    taken in groups of whole shards holding at least this many samples, and the samples of a group
    shuffled together.  Larger mixes more shards into every batch (data_prep fills shards in input
    order, so one shard is one region of the corpus: a window of one shard trains on one source at
    a time); its cost is 8 bytes a sample of indices per loader process (samples are read by random
    access, not buffered) and random reads spread over the group's shards.  0 disables shuffling."""
    pad_to_multiple_of: int = 8
    """Pad each batch's sequence length up to a multiple of this (tensor-core friendly)."""
    pin_memory: bool = True
    """Pin host batches for faster, asynchronous copies to the GPU (ignored on CPU)."""
    prefetch_factor: int = 4
    """Batches prefetched per loader worker."""
    mlm_probability: Optional[float] = None
    """Dynamic masking rate; None uses the value recorded in the manifest (0.15 by default)."""


@dataclass
class OptimizerConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    """Client optimizer handed to DeepSpeed."""
    lr: float = 1e-4
    """Peak learning rate (reached at the end of warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/LAMB moment decay rates (beta1, beta2)."""
    eps: float = 1e-6
    """Denominator epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and LayerNorm weights."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    bias_correction: bool = True
    """LAMB: apply Adam bias correction to the moments."""
    max_trust_ratio: float = 10.0
    """LAMB: upper clamp of the per-tensor trust ratio ||w|| / ||update||."""
    min_trust_ratio: float = 0.0
    """LAMB: lower clamp of the trust ratio."""
    nvlamb: bool = False
    """LAMB: NVLAMB variant, apply the trust ratio to excluded (no-decay) tensors too."""


@dataclass
class ScheduleConfig:
    warmup_steps: Optional[int] = None
    """Linear warmup length in optimizer steps.  Alternative to warmup_ratio: setting one (in a
    file over its base, or on the command line over the file) replaces the other."""
    warmup_ratio: Optional[float] = None
    """Warmup as a fraction of training.max_steps.  With neither set: 0.01."""
    decay: Literal["poly", "linear", "cosine", "constant"] = "poly"
    """Shape after warmup, measured from the end of warmup so the LR never jumps."""
    power: float = 0.5
    """Exponent of the polynomial decay (1.0 equals linear)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak."""


@dataclass
class TrainingConfig:
    micro_batch_size: int = 32
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all ranks = micro x accumulation x data-parallel size."""
    grad_accum_steps: Optional[int] = None
    """Micro-batches per optimizer step; None derives it from the batch sizes and world size."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    seq_len: int = 128
    """Maximum sequence length of the phase (must equal the shards' seq_len)."""
    max_predictions: int = 20
    """Upper bound of masked positions per sequence (MLM head computed only there)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; fp16 uses dynamic loss scaling."""
    initial_loss_scale_power: int = 16
    """fp16: the dynamic loss scale starts at 2**this."""
    seed: int = 1234
    """Seed of model init, data order, dynamic masking and dropout."""
    max_nonfinite_steps: int = 10
    """Stop with an error after this many consecutive steps with a non-finite loss."""
    collective_timeout_s: int = 1800
    """Timeout of collective operations, so a dead rank gives an error instead of a hang."""


@dataclass
class ZeroConfig:
    stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+grads), 3 (+params)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states in host memory."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in host memory (stage 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""


@dataclass
class KernelsConfig:
    attention: Literal["sdpa", "fused_softmax", "reference"] = "sdpa"
    """Attention path: torch SDPA (flash/efficient kernels on GPU), our fused masked softmax, or plain torch."""
    layer_norm: Literal["torch", "fused", "reference"] = "torch"
    """LayerNorm: torch's native op, our fused residual+LayerNorm kernel, or the reference."""
    lamb: Literal["reference", "fused"] = "reference"
    """LAMB step: pure PyTorch or our multi-tensor CUDA kernel (falls back when unavailable)."""
    unpad: bool = False
    """Run token-wise work (every matmul but attention's, LayerNorm, GELU, dropout) on the real
    tokens only, skipping padding.  Same outputs as padded; different dropout draws and summation
    order.  Its ``nonzero`` is one host sync a step on CUDA; on CPU it is free (docs/performance.md)."""
    compile: bool = False
    """Compile the model with torch.compile (through DeepSpeed's ``engine.compile()``, so parameter
    names and checkpoints stay those of the eager model).  The first steps include compile time."""


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Checkpoint directory (relative paths are under logging.run_dir)."""
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Number of most recent checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the latest checkpoint in dir when there is one."""
    init_from: Optional[str] = None
    """Start from another run's checkpoint weights (phase 2 from phase 1)."""
    init_optimizer: bool = False
    """With init_from: also load the optimizer state."""
    allow_fingerprint_mismatch: bool = False
    """Resume although data/tokenizer/config fingerprints differ from the checkpoint's."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Root of this run's outputs: TensorBoard events, JSONL log, checkpoints, plots."""
    every_steps: int = 10
    """Log training metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0."""
    peak_tflops: Optional[float] = None
    """Device peak TFLOP/s for MFU; None looks it up by device name."""


@dataclass
class EvalConfig:
    every_steps: int = 500
    """Held-out evaluation every N optimizer steps (0 disables; always at the end)."""
    max_batches: int = 50
    """Held-out batches per evaluation (0: the whole split)."""
    micro_batch_size: Optional[int] = None
    """Evaluation batch size; None uses training.micro_batch_size."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def grad_accum_steps(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step for this world size (validated by ``validate``)."""
        t = self.training
        if t.grad_accum_steps is not None:
            return t.grad_accum_steps
        return max(1, t.global_batch_size // (t.micro_batch_size * data_parallel_size))


# --------------------------------------------------------------------------------------------
# Building a dataclass tree from plain data, with type checks
# --------------------------------------------------------------------------------------------
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (a float field's int or number string made a
    float), or record a problem."""
    origin = typing.get_origin(tp)
    bad = f"{key}: got {value!r}, expected {_describe(tp)}"
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key, problems)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        problems.append(bad + (f" (did you mean {close[0]!r}?)" if close else ""))
        return None
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(bad)
            return None
        return [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        return _coerce_float(value, key, bad, problems)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(bad)
    return None


def _coerce_float(value: Any, key: str, bad: str, problems: list[str]) -> Optional[float]:
    """A finite float from an int, a float or a string float() reads (PyYAML reads 1e-3 as a string)."""
    number, problem = finite_number(value)
    if problem == NOT_A_NUMBER:
        problems.append(bad)
    elif problem is not None:
        problems.append(f"{key}: got {value!r}, expected a finite number")
    else:
        return float(number)
    return None


def _build(cls: type, data: Any, prefix: str, problems: list[str]):
    """Instantiate dataclass ``cls`` from mapping ``data``, recording every problem."""
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            full = f"{prefix}.{close[0]}" if (close and prefix) else (close[0] if close else "")
            hint = f"did you mean {full!r}?" if close else f"known keys: {', '.join(fields)}"
            problems.append(f"{dotted}: unknown key ({hint})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems)
        else:
            before = len(problems)
            coerced = _coerce(value, tp, dotted, problems)
            if len(problems) == before:
                kwargs[key] = coerced
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# YAML loading, base files, command-line overrides
# --------------------------------------------------------------------------------------------
def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``base:`` recursively (relative to the including file)."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError([f"base: cycle {' -> '.join(chain + (path,))}"], source=path)
    try:
        data = read_yaml_mapping(path)
    except ConfigFileError as err:
        raise ConfigError([str(err)]) from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([f"base: expected a path to another YAML file, got {base!r}"], source=path)
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return deep_merge(_read_yaml(base_path, chain + (path,)), data)


# Keys that say the same thing two ways: a layer (a child file over its base, the command line
# over the file) that sets one of them replaces the other too; one layer setting both is an error.
ALTERNATIVES = {"schedule": (("warmup_steps", "warmup_ratio"),)}


def deep_merge(base: dict, over: dict, _section: str = "") -> dict:
    """Merge mapping ``over`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = dict(base)
    for group in ALTERNATIVES.get(_section, ()):
        given = [k for k in group if k in over]
        if len(given) == 1:
            for k in group:
                if k != given[0]:
                    out.pop(k, None)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, key if not _section else f"{_section}.{key}")
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["training.max_steps=10", "zero.stage=2"]`` into a nested mapping (values parsed as YAML)."""
    problems, tree = [], {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or "." not in key:
            problems.append(f"override {item!r}: expected section.key=value (e.g. training.max_steps=100)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="command line")
    return tree


def load_config(path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Load defaults < YAML file (with bases) < ``overrides``; validate; return the Config.

    ``world_size`` (data-parallel size), when known, enables the batch-size product rule.
    """
    data = _read_yaml(path) if path else {}
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data, source=path, world_size=world_size)


def config_from_dict(data: dict, source: str | None = None, world_size: int | None = None) -> Config:
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    # Range and cross-field rules run too, except those that mention a key already reported:
    # that key kept its default, and a rule about the default would mislead.
    reported = {q.split(":", 1)[0].split("[", 1)[0].rsplit(".", 1)[-1] for q in problems}
    problems.extend(q for q in validate(cfg, world_size) if not any(k in q for k in reported))
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Value ranges and cross-field rules, all in one place
# --------------------------------------------------------------------------------------------
def _positive(problems: list[str], cfg: Config, *keys: str, allow_zero: bool = False) -> None:
    for dotted in keys:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            problems.append(f"{dotted}: got {value!r}, expected {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every value-range and cross-field problem of ``cfg`` (empty list when it is valid)."""
    p: list[str] = []
    m, t, o, s = cfg.model, cfg.training, cfg.optimizer, cfg.schedule
    _positive(p, cfg, "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
              "model.intermediate_size", "model.max_position_embeddings", "model.type_vocab_size",
              "model.embedding_size", "model.pad_vocab_multiple", "model.layer_norm_eps",
              "model.initializer_range", "training.micro_batch_size", "training.global_batch_size",
              "training.grad_accum_steps", "training.max_steps", "training.seq_len",
              "training.max_predictions", "training.max_nonfinite_steps", "training.collective_timeout_s",
              "optimizer.lr", "optimizer.eps", "checkpoint.every_steps", "checkpoint.keep_last",
              "logging.every_steps", "data.pad_to_multiple_of", "data.prefetch_factor",
              "eval.micro_batch_size")
    _positive(p, cfg, "optimizer.weight_decay", "optimizer.max_grad_norm", "data.num_workers",
              "data.shuffle_buffer", "eval.every_steps", "eval.max_batches", "schedule.warmup_steps",
              "training.seed", allow_zero=True)
    if m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}): "
                 f"{m.hidden_size} % {m.num_heads} = {m.hidden_size % m.num_heads}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            p.append(f"model.{name}: got {getattr(m, name)!r}, expected 0 <= p < 1")
    if m.arch == "bert" and (m.embedding_size not in (None, m.hidden_size) or m.share_layers):
        p.append("model.embedding_size / model.share_layers are ALBERT options: set model.arch=albert")
    if m.arch == "albert" and m.sentence_head == "nsp":
        p.append("model.sentence_head: ALBERT uses 'sop' (or 'none'), got 'nsp'")
    if t.seq_len > m.max_position_embeddings:
        p.append(f"training.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                 f"({m.max_position_embeddings})")
    if t.max_predictions > t.seq_len:
        p.append(f"training.max_predictions ({t.max_predictions}) exceeds training.seq_len ({t.seq_len})")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optimizer.betas: got {o.betas!r}, expected two numbers in [0, 1)")
    if not 0.0 <= o.min_trust_ratio <= o.max_trust_ratio:
        p.append(f"optimizer.min_trust_ratio ({o.min_trust_ratio}) must be in [0, optimizer.max_trust_ratio "
                 f"({o.max_trust_ratio})]")
    if s.warmup_ratio is not None and not 0.0 <= s.warmup_ratio < 1.0:
        p.append(f"schedule.warmup_ratio: got {s.warmup_ratio!r}, expected 0 <= ratio < 1")
    if s.warmup_steps is not None and s.warmup_ratio is not None:
        p.append(f"schedule.warmup_steps ({s.warmup_steps}) and schedule.warmup_ratio ({s.warmup_ratio}) are both "
                 f"set in one place; they are alternatives: set one")
    if s.warmup_steps is not None and s.warmup_steps >= t.max_steps:
        p.append(f"schedule.warmup_steps ({s.warmup_steps}) must be below training.max_steps ({t.max_steps})")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        p.append(f"schedule.min_lr_ratio: got {s.min_lr_ratio!r}, expected 0 <= ratio <= 1")
    if s.power <= 0:
        p.append(f"schedule.power: got {s.power!r}, expected > 0")
    if cfg.zero.stage not in (0, 1, 2, 3):
        p.append(f"zero.stage: got {cfg.zero.stage!r}, expected one of 0, 1, 2, 3")
    if cfg.zero.offload_params != "none" and cfg.zero.stage != 3:
        p.append(f"zero.offload_params=cpu needs zero.stage=3 (got stage {cfg.zero.stage})")
    if cfg.zero.offload_optimizer != "none" and cfg.zero.stage == 0:
        p.append("zero.offload_optimizer=cpu needs zero.stage >= 1")
    p.extend(_batch_rule(t, world_size))
    return p


def _batch_rule(t: TrainingConfig, world_size: int | None) -> list[str]:
    mb, gb, acc = t.micro_batch_size, t.global_batch_size, t.grad_accum_steps
    if mb <= 0 or gb <= 0 or (acc is not None and acc <= 0):
        return []  # already reported by the range checks
    if world_size is None:
        if gb % mb:
            return [f"training.global_batch_size ({gb}) must be a multiple of training.micro_batch_size ({mb})"]
        if acc is not None and gb % (mb * acc):
            return [f"training.global_batch_size ({gb}) must be a multiple of micro_batch_size x "
                    f"grad_accum_steps ({mb} x {acc} = {mb * acc})"]
        return []
    if acc is None:
        if gb % (mb * world_size):
            return [f"training.global_batch_size must equal micro_batch_size x grad_accum_steps x data-parallel "
                    f"size, but {gb} is not a multiple of {mb} x {world_size} = {mb * world_size}"]
        return []
    if mb * acc * world_size != gb:
        return [f"training.global_batch_size must equal micro_batch_size x grad_accum_steps x data-parallel size: "
                f"{mb} x {acc} x {world_size} = {mb * acc * world_size} != {gb}"]
    return []
