"""The fine-tuning configuration: one typed tree, loaded by the project's config engine.

    python -m pretrain finetune --config configs/finetune/NAME.yaml [section.key=value ...]

Loaded as pretraining's config is (``data_prep.settings``: YAML with ``base:``, then command-line
``section.key=value`` overrides, then the few flags of the short form, ``--checkpoint`` / ``--train`` /
``--dev`` / ``--out`` / ``--task``, which are keys too); every problem is reported at once in one
``ConfigError``, a setting without effect is a ``ConfigWarning``.

Sections: ``task`` (what to learn and from which files), ``token`` and ``qa`` (settings of those task
types), ``model`` (the starting checkpoint and the head), ``training``, ``eval``, ``checkpoint``,
``logging``; and pretraining's own ``optimizer`` and ``schedule`` (with fine-tuning defaults: AdamW at
2e-5, linear decay after 10% warmup, plus ``optimizer.layer_lr_decay``), ``zero`` and ``kernels``.  The
engine (pretrain.engine) reads this tree as it reads pretraining's: ``training.micro_batch_size``,
``precision``, ``initial_loss_scale_power``, the ``zero``, ``optimizer`` and ``kernels`` sections and
``grad_accum_steps()``.  Pretraining's cross-field rules apply here wherever every key they read has
the same type here (the batch product, betas, warmup alternatives, ZeRO offload, LAMB-only options).

Column keys take a header name or a 0-based column index (``text_column: 3``; a string of digits is
an index).  Paths are used as given (relative to the current directory), as in pretraining.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from data_prep import settings
from data_prep.settings import ConfigError, ConfigFileError, setting
from pretrain import config as pretraining
from pretrain.config import KernelsConfig, OptimizerConfig, ScheduleConfig, TrackersConfig, ZeroConfig

__all__ = ["FinetuneConfig", "ConfigError", "load_finetune_config", "finetune_config_from_dict", "dump_config",
           "column", "TASK_TYPES", "METRICS", "MAIN_METRIC", "DEFAULT_WARMUP_RATIO"]

TASK_TYPES = ("classification", "regression", "token", "qa")
DEFAULT_MAX_LENGTH = 128
DEFAULT_WARMUP_RATIO = 0.1
# The dev metrics of each task type (eval.metric picks one); the first is the default.  All are
# better higher, except loss.
METRICS = {
    "classification": ("accuracy", "f1", "matthews", "loss"),
    "regression": ("pearson_spearman_mean", "pearson", "spearman", "loss"),
    "token": ("f1", "precision", "recall", "accuracy", "loss"),
    "qa": ("f1", "exact", "best_f1", "best_exact", "loss"),
}
MAIN_METRIC = {task: names[0] for task, names in METRICS.items()}
COLUMN_KEYS = ("text_column", "text_pair_column", "label_column")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    type: Literal["auto", "classification", "regression", "token", "qa"] = setting("auto", flags="--task")
    """What to learn: ``classification`` (a class per text or text pair), ``regression`` (a number per
    text or pair, STS-B), ``token`` (a tag per word, CoNLL files), ``qa`` (extractive, SQuAD JSON);
    ``auto``: classification or regression, from the train file's labels (integers and names are
    classes; numbers not all integers are regression)."""
    train: str = setting("", path=True, flags="--train")
    """Training file: TSV, CSV or JSONL (classification, regression), CoNLL (token), SQuAD JSON (qa)."""
    dev: str = setting("", path=True, flags="--dev")
    """Development file, in the train file's format: evaluated during training, its metrics reported."""
    format: Optional[Literal["tsv", "csv", "jsonl"]] = None
    """Format of classification/regression files; None: from the suffix (.tsv, .csv, .jsonl/.json)."""
    text_column: str = "text"
    """Column (header name, JSON key, or 0-based index) of the text."""
    text_pair_column: Optional[str] = "text_pair"
    """Column of the second text of a pair (MNLI, STS-B); the default ``text_pair`` is optional (a file
    without it holds single texts), another name must exist; None: single texts."""
    label_column: str = "label"
    """Column of the label (a class name or a number)."""
    header: bool = True
    """TSV/CSV: the first row names the columns."""
    labels: Optional[list[str]] = None
    """The label list in id order: class names, or token tags; None: every label of the train and dev
    files, sorted (integers numerically).  A label of the files not in the list is an error."""
    max_length: Optional[int] = setting(None, ge=3)
    """Longest input in tokens, [CLS] and [SEP] included (longer: truncated, QA and token windows); None:
    128, or the model's max_position_embeddings when that is smaller."""


@dataclass
class TokenTaskConfig:
    token_column: int = 0
    """CoNLL column of the word."""
    tag_column: int = -1
    """CoNLL column of the tag (-1: the last)."""
    label_all_subtokens: bool = False
    """Train on every sub-token of a word (B-X continuations as I-X), not only its first; predictions
    are read at the first sub-token either way."""
    tag_scheme: Literal["iob1", "iob2", "bioes"] = "iob2"
    """Chunk scheme of the tags, for entity-level scores (conlleval's rules)."""


@dataclass
class QATaskConfig:
    doc_stride: int = setting(128, gt=0)
    """Tokens between the starts of a long context's windows."""
    max_query_length: int = setting(64, gt=0)
    """Questions are cut to this many tokens."""
    max_answer_length: int = setting(30, gt=0)
    """Longest predicted answer, in tokens."""
    n_best: int = setting(20, gt=0)
    """Start and end candidates per window considered when decoding."""
    version_2: Optional[bool] = None
    """SQuAD v2.0 (unanswerable questions, null answer, best-threshold scores); None: when a question of
    the train or dev file is unanswerable."""
    null_score_diff_threshold: float = 0.0
    """v2: predict no answer when the null score exceeds the best span's by more than this."""


@dataclass
class ModelSection:
    checkpoint: str = setting("", path=True, flags="--checkpoint")
    """The model to start from: our checkpoint directory (a pretraining or a fine-tuned one, or a run's
    checkpoint root with ``latest``), or a transformers directory."""
    tokenizer: Optional[str] = setting(None, path=True)
    """Tokenizer directory (tokenizer.json or vocab.txt); None: the checkpoint's."""
    head_dropout: Optional[float] = setting(None, ge=0, lt=1)
    """Dropout before the output layer (classification, token; qa for arch distilbert, as its qa_dropout);
    None: the encoder's hidden_dropout (arch distilbert's classification head: 0.2, its seq_classif_dropout)."""
    new_head: bool = False
    """Start a fresh head even when the checkpoint is fine-tuned for the same task type."""
    init: Literal["pretrained", "random"] = "pretrained"
    """``random``: the checkpoint's architecture and tokenizer with none of its weights (each seed's fresh
    BERT initialisation): the baseline that shows what pretraining is worth at the same fine-tuning budget."""


@dataclass
class TrainingSection:
    micro_batch_size: int = setting(32, gt=0)
    """Examples (features: QA and token windows) per rank per forward/backward."""
    global_batch_size: int = setting(32, gt=0)
    """Examples per optimizer step over all ranks = micro x accumulation x data-parallel size."""
    grad_accum_steps: Optional[int] = setting(None, gt=0)
    """Micro-batches per optimizer step; None derives it from the batch sizes and world size."""
    epochs: int = setting(3, gt=0)
    """Passes over the training examples (a pass's last batch is filled with its first examples)."""
    max_steps: Optional[int] = setting(None, gt=0)
    """Optimizer steps to train, instead of epochs x steps per epoch."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """One run per seed (head init, data order, dropout), each in RUN_DIR/seed-N; metrics.json has each
    seed's dev metrics and their mean and standard deviation."""
    length_grouped: bool = False
    """Group examples of similar length into batches (less padding): each epoch's seeded order is cut into
    windows of length_group_batches global batches, each sorted by length (longest first) and cut into
    batches; the batches' order is then shuffled with the same seed."""
    length_group_batches: int = setting(50, gt=0)
    """Global batches per length-sorted window (length_grouped)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16 is faster where supported; fp16 uses dynamic loss scaling)."""
    initial_loss_scale_power: int = 16
    """fp16: the dynamic loss scale starts at 2**this."""
    max_nonfinite_steps: int = setting(10, gt=0)
    """Stop with an error after this many consecutive steps with a non-finite loss."""
    collective_timeout_s: int = setting(1800, gt=0)
    """Timeout of collective operations, so a dead rank gives an error instead of a hang."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in the backward pass instead of keeping them, as
    pretraining's: the same losses, less memory for long sequences, about one more encoder forward a step."""


@dataclass
class FinetuneOptimizerConfig(OptimizerConfig):
    name: Literal["lamb", "adamw"] = "adamw"
    """Client optimizer handed to DeepSpeed (fine-tuning: AdamW)."""
    lr: float = setting(2e-5, gt=0)
    """Peak learning rate of the head (reached at the end of warmup); lower layers: layer_lr_decay."""
    eps: float = setting(1e-8, gt=0)
    """Denominator epsilon (transformers' default)."""
    layer_lr_decay: float = setting(1.0, gt=0, le=1)
    """Layer-wise LR decay f: the head (pooler, output layer) gets lr, the top encoder layer lr x f, the one
    below lr x f^2, ..., the embeddings lr x f^(L+1); ALBERT's one shared layer counts as the top layer.
    1.0: one rate for all."""


@dataclass
class FinetuneScheduleConfig(ScheduleConfig):
    warmup_ratio: Optional[float] = setting(None, ge=0, lt=1)
    """Warmup as a fraction of the run's optimizer steps.  With neither this nor warmup_steps set: 0.1."""
    decay: Literal["poly", "linear", "cosine", "constant"] = "linear"
    """Shape after warmup, measured from the end of warmup (fine-tuning: linear to min_lr_ratio)."""


@dataclass
class FinetuneZeroConfig(ZeroConfig):
    stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+grads), 3 (+params).  Fine-tuning:
    0, as a BERT fits a device with its optimizer state; a stage above 0 partitions what each rank holds
    at a cost per step (23% on bench/finetune_step.py's CPU step at one rank, where it saves nothing)."""


@dataclass
class EvalSection:
    every_steps: int = setting(0, ge=0)
    """Evaluate on the dev file every N optimizer steps as well (0: only at each epoch end; always at the
    last step)."""
    micro_batch_size: Optional[int] = setting(None, gt=0)
    """Evaluation batch size per rank; None: 2 x training.micro_batch_size."""
    metric: Optional[str] = None
    """The dev metric that picks the best model and drives early stopping; None: the task's main metric:
    accuracy (classification), pearson_spearman_mean (regression, as STS-B's score), f1 (token: entity F1;
    qa: SQuAD F1).  Others: f1, matthews, loss (classification); pearson, spearman, loss (regression);
    precision, recall, accuracy, loss (token); exact, best_f1, best_exact, loss (qa).  Higher is better,
    except loss."""
    early_stopping_patience: int = setting(0, ge=0)
    """Stop a seed's run after this many evaluations in a row without a better metric (0: never)."""


@dataclass
class CheckpointSection:
    best: bool = True
    """Keep the best model (by eval.metric) as our checkpoint in SEED_DIR/best (a fine-tuned checkpoint:
    from_pretrained and ``python -m pretrain finetune --checkpoint`` read it)."""
    export_hf: bool = True
    """Also write the best model as a transformers directory in SEED_DIR/hf (with checkpoint.best)."""
    every_steps: int = setting(0, ge=0)
    """Save a resumable checkpoint of the seed in training (the engine's model and optimizer state, the
    schedule, every rank's RNG state, the data position, the best evaluation so far) in SEED_DIR/checkpoints
    every N optimizer steps (0: only when a stop signal ends the run: SIGTERM, SIGUSR1, Ctrl-C).  Rerunning
    the command resumes from it; a seed's checkpoints are removed once the seed is done."""
    keep_last: int = setting(1, gt=0)
    """Number of a seed's most recent resumable checkpoints kept."""


@dataclass
class FinetuneLoggingConfig(TrackersConfig):
    run_dir: str = setting("runs/finetune", path=True, flags="--out")
    """Root of the outputs: metrics.json, config.yaml, and per seed SEED_DIR = seed-N with metrics.jsonl,
    TensorBoard events, predictions.jsonl, best/ and hf/."""
    every_steps: int = setting(10, gt=0)
    """Log the training loss and learning rate every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under SEED_DIR/tensorboard."""
    progress_bar: bool = True
    """Rank 0's progress: a bar with ETA when stderr is a terminal; otherwise, or when false, one plain line
    a logging window on stdout (step, loss, lr, seq/s, tok/s, loader wait, ETA), readable in a log file."""


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    token: TokenTaskConfig = field(default_factory=TokenTaskConfig)
    qa: QATaskConfig = field(default_factory=QATaskConfig)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: FinetuneOptimizerConfig = field(default_factory=FinetuneOptimizerConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: FinetuneLoggingConfig = field(default_factory=FinetuneLoggingConfig)
    zero: FinetuneZeroConfig = field(default_factory=FinetuneZeroConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    # Micro-batches per optimizer step for a world size: pretraining's rule, on this tree's training section.
    grad_accum_steps = pretraining.Config.grad_accum_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
ALTERNATIVES = {"schedule": (("warmup_steps", "warmup_ratio"),)}


def load_finetune_config(path: str | None = None, overrides: list[str] | None = None,
                         flags: dict | None = None, world_size: int | None = None) -> FinetuneConfig:
    """defaults < YAML ``path`` (with bases) < ``overrides`` (``section.key=value``) < ``flags``
    ({dotted key: value}, the short form's --checkpoint/--train/--dev/--out/--task); validated."""
    try:
        data = settings.read_file(path, ALTERNATIVES) if path else {}
    except ConfigFileError as err:
        raise ConfigError([str(err)]) from None
    if overrides:
        data = settings.merge(data, settings.parse_overrides(overrides, "training.epochs=2"), ALTERNATIVES)
    if flags:
        data = settings.merge(data, settings.unflatten(flags), ALTERNATIVES)
    return finetune_config_from_dict(data, source=path or "the command line", world_size=world_size)


def finetune_config_from_dict(data: dict, source: str | None = None, world_size: int | None = None) -> FinetuneConfig:
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, dict):   # a column index given as a number: the field holds it as a string of digits
        data = {**data, "task": {k: str(v) if k in COLUMN_KEYS and type(v) is int else v for k, v in task.items()}}
    return settings.build(FinetuneConfig, data, source=source, rules=RULES, context=(world_size,), warn=WARNINGS)


def dump_config(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def column(value: Optional[str]) -> Union[str, int, None]:
    """A column key's value as tasks.read_classification takes it: an index for a string of digits."""
    if value is not None and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return value


def warmup_ratio_or_default(s: ScheduleConfig) -> ScheduleConfig:
    """``s`` with fine-tuning's default warmup (a ratio of 0.1) when it sets neither warmup key."""
    if s.warmup_steps is None and s.warmup_ratio is None:
        return dataclasses.replace(s, warmup_ratio=DEFAULT_WARMUP_RATIO)
    return s


def check_metric(cfg: FinetuneConfig, task_type: str) -> str:
    """The metric of eval.metric (or the task's main one), ConfigError when the task has no such metric."""
    metric = cfg.eval.metric or MAIN_METRIC[task_type]
    if metric not in METRICS[task_type]:
        raise ConfigError([f"eval.metric: {metric!r} is not a dev metric of task {task_type}; expected one of "
                           f"{', '.join(METRICS[task_type])}"])
    return metric


# --------------------------------------------------------------------------------------------
# Cross-field rules: pretraining's where they fit, and fine-tuning's own
# --------------------------------------------------------------------------------------------
def _shared(rules: settings.Rules) -> settings.Rules:
    """Pretraining's rules whose every key exists here with the same type (and so the same meaning)."""
    ours, theirs = settings.keys(FinetuneConfig), settings.keys(pretraining.Config)
    return settings.Rules(rule for rule in rules
                          if all(k in ours and k in theirs and ours[k].type == theirs[k].type for k in rule[0]))


RULES = _shared(pretraining.RULES)
WARNINGS = _shared(pretraining.WARNINGS)


@RULES.check("model.checkpoint", "task.train", "task.dev")
def _required(cfg: FinetuneConfig, _world_size):
    missing = {"model.checkpoint": "the model to start from (--checkpoint DIR)",
               "task.train": "the training file (--train FILE)", "task.dev": "the dev file (--dev FILE)"}
    values = {"model.checkpoint": cfg.model.checkpoint, "task.train": cfg.task.train, "task.dev": cfg.task.dev}
    return [f"{key}: missing: {what}" for key, what in missing.items() if not values[key]]


@RULES.check("training.seeds")
def _seeds(cfg: FinetuneConfig, _world_size):
    seeds = cfg.training.seeds
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        return f"training.seeds: got {seeds!r}, expected a list of distinct integers >= 0 (one run each)"


@RULES.check("task.labels")
def _labels(cfg: FinetuneConfig, _world_size):
    labels = cfg.task.labels
    if labels is not None and (len(set(labels)) != len(labels) or not all(labels)):
        return f"task.labels: got {labels!r}, expected distinct non-empty names"


@RULES.check("task.type", "eval.metric")
def _metric(cfg: FinetuneConfig, _world_size):
    metric, task = cfg.eval.metric, cfg.task.type
    if metric is None:
        return None
    allowed = METRICS[task] if task != "auto" else METRICS["classification"] + METRICS["regression"]
    if metric not in allowed:
        return (f"eval.metric: {metric!r} is not a dev metric of task {task}; expected one of "
                f"{', '.join(dict.fromkeys(allowed))}")


@RULES.check("qa.max_query_length", "task.max_length", "task.type")
def _query_fits(cfg: FinetuneConfig, _world_size):
    length = cfg.task.max_length
    if cfg.task.type == "qa" and length is not None and cfg.qa.max_query_length + 3 >= length:
        return (f"qa.max_query_length ({cfg.qa.max_query_length}) + 3 must be below task.max_length "
                f"({length}): a window needs room for the context")


@WARNINGS.check("task.type", "token", "qa")
def _other_task_settings(cfg: FinetuneConfig, _world_size):
    out = []
    for section, task in (("token", "token"), ("qa", "qa")):
        if cfg.task.type == task:
            continue
        current, default = getattr(cfg, section), type(getattr(cfg, section))()
        out += [f"{section}.{f.name}={getattr(current, f.name)!r} has no effect: it is a {task} setting and "
                f"task.type={cfg.task.type}" for f in dataclasses.fields(current)
                if getattr(current, f.name) != getattr(default, f.name)]
    return out


@WARNINGS.check("checkpoint.best", "checkpoint.export_hf")
def _export_needs_best(cfg: FinetuneConfig, _world_size):
    if cfg.checkpoint.export_hf and not cfg.checkpoint.best:
        return "checkpoint.export_hf=true has no effect: it exports the best model and checkpoint.best=false"
