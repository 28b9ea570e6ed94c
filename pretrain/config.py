"""The one typed configuration tree for pretraining.

Every setting lives here as a documented dataclass field (its docstring is the line after it;
docs/configuration.md is generated from them).  Configs are loaded from YAML (a key given twice
or an empty file is an error; an optional top-level ``base:`` names another YAML, relative to the
file, that this one extends), then ``section.key=value`` overrides from the command line are
applied.  Precedence: CLI > file (> its bases) > defaults.  Paths are used as given: relative to
the current directory wherever they are written (``data_prep.settings`` has the reason).

Validation collects every problem (unknown keys with a close-match suggestion, wrong types,
values out of range, cross-field rules) and raises them together in one ``ConfigError``; a valid
setting that has no effect is a ``ConfigWarning``.

Of bertforge this module imports only the config engine, ``data_prep.settings`` (shared with
data_prep, which never imports pretrain); components receive only their own section.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from data_prep import settings
from data_prep.settings import ConfigError, ConfigFileError, setting
from pretrain.mixing import negligible

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "dump_config", "ignored_option_warnings"]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: Literal["bert", "albert", "roberta", "distilbert"] = "bert"
    """Model family.  ``albert`` enables the factorized embedding and the ALBERT export format; ``roberta``
    is BERT's post-LN encoder with RoBERTa's position ids (from 2, past its padding index 1, which
    padding slots get: max_position_embeddings = longest sequence + 2) and its export format
    (RobertaForMaskedLM; no sentence head); ``distilbert`` is BERT's post-LN encoder without token-type
    embeddings (segment ids are ignored) and without dropout on the attention output, exported as
    DistilBertForMaskedLM (no sentence head; layer_norm_eps 1e-12, the value transformers fixes)."""
    vocab_size: int = setting(30522, gt=0)
    """Tokenizer vocabulary size (the exported size; padded internally, see pad_vocab_multiple)."""
    hidden_size: int = setting(768, gt=0)
    """Width H of the encoder."""
    num_layers: int = setting(12, gt=0)
    """Number of transformer layers L."""
    num_heads: int = setting(12, gt=0)
    """Attention heads; must divide hidden_size."""
    intermediate_size: int = setting(3072, gt=0)
    """Width of the feed-forward layer (4H for BERT)."""
    max_position_embeddings: int = setting(512, gt=0)
    """Longest sequence the learned position table supports."""
    type_vocab_size: int = setting(2, gt=0)
    """Number of token-type (segment) embeddings (none for arch distilbert, which has no such table)."""
    embedding_size: Optional[int] = setting(None, gt=0)
    """ALBERT factorized embedding size E (V x E + E x H); None means E = H (no projection)."""
    share_layers: bool = False
    """ALBERT cross-layer parameter sharing: one set of layer weights applied num_layers times."""
    layer_norm_position: Literal["post", "pre"] = "post"
    """``post``: LN after each residual add (original BERT); ``pre``: LN before each sublayer."""
    layer_norm_eps: float = setting(1e-12, gt=0)
    """Epsilon of every LayerNorm."""
    hidden_act: Literal["gelu", "gelu_tanh"] = "gelu"
    """Feed-forward activation: exact erf GELU (BERT) or its tanh approximation (ALBERT's gelu_new)."""
    hidden_dropout: float = setting(0.1, ge=0, lt=1)
    """Dropout on embeddings and sublayer outputs."""
    attention_dropout: float = setting(0.1, ge=0, lt=1)
    """Dropout on attention probabilities."""
    initializer_range: float = setting(0.02, gt=0)
    """Std of the normal initialization of weights (biases 0, LayerNorm 1/0)."""
    sentence_head: Literal["nsp", "sop", "none"] = "nsp"
    """Binary sentence-pair head: next-sentence (BERT), sentence-order (ALBERT) or none (RoBERTa)."""
    pad_vocab_multiple: int = setting(8, gt=0)
    """Pad the embedding/decoder rows to a multiple of this inside the model (never in exports)."""


DISTILBERT_LAYER_NORM_EPS = 1e-12
"""transformers' DistilBERT has this LayerNorm epsilon built in (its config has no setting for it)."""


def position_offset(m: ModelConfig) -> int:
    """Where position ids start: 0, or RoBERTa's 2 (its padding index 1 is the padding slots' position)."""
    return 2 if m.arch == "roberta" else 0


def max_seq_len(m: ModelConfig) -> int:
    """The longest sequence the position table holds: max_position_embeddings less RoBERTa's offset."""
    return m.max_position_embeddings - position_offset(m)


@dataclass
class SourceConfig:
    """One corpus of a mixture (an item of ``data.sources``)."""
    dir: str = setting("", path=True)
    """Where its shards are: as ``data.dir``."""
    weight: float = setting(1.0, gt=0)
    """Its share of the training samples, relative to the other sources' weights."""
    name: Optional[str] = None
    """Its name in the logs (``data/<name>/samples``, ``eval/<name>/...``); None: the last part of dir (before a
    final ``shards``; of a ``pipe:``, of the path before ``{name}``, and required when there is none)."""


@dataclass
class DataConfig:
    dir: str = setting("", path=True)
    """Shards written by ``data_prep shards`` (manifest.json, tokenizer/, train-*/val-* shards): a local
    directory, ``file://``, ``http(s)://`` or another fsspec URL (``s3://``, ``gs://`` with their package
    installed), or ``pipe:<command with {name}>`` that writes a file of the directory to stdout."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of shard directories instead of ``dir``: a list of ``{dir: ..., weight: ...,
    name: ...}`` (weight 1 and name from dir when left out).  Every global sample position maps to one
    source by the weights (at every prefix of training each source's count is within one sample of its
    share for up to three sources; pretrain/mixing.py gives the bound for more); each source repeats on its own epoch counter.  The sources must share the tokenizer and the
    shard settings."""
    cache_dir: Optional[str] = setting(None, path=True)
    """Node-local directory where shards read from a URL or a ``pipe:`` are kept once verified, so later
    epochs and runs read them from there (None: read them again each time).  Shards of a local
    directory are read in place, never copied here."""
    tokenizer: Optional[str] = setting(None, path=True)
    """Tokenizer directory of the run; its hash must match the shards' (None: trust the manifest)."""
    num_workers: int = setting(2, ge=0)
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle_buffer: int = setting(131072, ge=0)
    """Size of the shuffle window of the global sample order: each epoch the shards are permuted,
    taken in groups of whole shards holding at least this many samples, and the samples of a group
    shuffled together.  Larger mixes more shards into every batch (data_prep fills shards in input
    order, so one shard is one region of the corpus: a window of one shard trains on one source at
    a time).  Its cost is memory: a loader worker keeps the decoded shards of the current and the next
    window, per source: ~2 x shuffle_buffer x the decoded bytes of a sample (dynamic masking, measured:
    ~215 B at seq 128, ~585 B at 512, so ~56 / ~153 MB per worker at the default; docs/training.md,
    "Memory").  0 disables shuffling (then two shards are kept)."""
    pad_to_multiple_of: int = setting(8, gt=0)
    """Pad each batch's sequence length up to a multiple of this (tensor-core friendly)."""
    packing: bool = False
    """Pack the instances of each training micro-batch into as few rows of seq_len as they fit (first-fit
    decreasing), attention confined to each instance: no FLOPs on the padding of short instances.  A
    micro-batch keeps its ``training.micro_batch_size`` instances (the unpacked ones: same losses, sample
    order, resume and LR schedule) and takes fewer rows.  Held-out evaluation stays unpacked
    (docs/training.md, "Packing")."""
    max_instances_per_row: int = setting(8, gt=0)
    """With packing: at most this many instances share a row."""
    pin_memory: bool = True
    """Pin host batches for faster, asynchronous copies to the GPU (ignored on CPU)."""
    prefetch_factor: int = setting(4, gt=0)
    """Batches prefetched per loader worker."""
    mlm_probability: Optional[float] = None
    """Dynamic masking rate; None uses the value recorded in the manifest (0.15 by default).
    Statically masked shards carry their masks, so there it has no effect (a warning says so)."""

    def source_list(self) -> list[SourceConfig]:
        """The sources of the run: ``dir`` as one source of weight 1 when it is set (a loaded config never
        sets both; a command that points a config at other shards, ``pretrain eval --data``, sets dir),
        else ``sources``."""
        if self.dir or not self.sources:
            return [SourceConfig(dir=self.dir, name=_default_name(self.dir) or "data")]
        return list(self.sources)


@dataclass
class OptimizerConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    """Client optimizer handed to DeepSpeed."""
    lr: float = setting(1e-4, gt=0)
    """Peak learning rate (reached at the end of warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/LAMB moment decay rates (beta1, beta2)."""
    eps: float = setting(1e-6, gt=0)
    """Denominator epsilon."""
    weight_decay: float = setting(0.01, ge=0)
    """Decoupled weight decay; never applied to biases and LayerNorm weights."""
    max_grad_norm: float = setting(1.0, ge=0)
    """Global gradient-norm clipping threshold (0 disables)."""
    bias_correction: bool = True
    """LAMB: apply Adam bias correction to the moments."""
    max_trust_ratio: float = 10.0
    """LAMB: upper clamp of the per-tensor trust ratio ||w|| / ||update||."""
    min_trust_ratio: float = setting(0.0, ge=0)
    """LAMB: lower clamp of the trust ratio."""
    nvlamb: bool = False
    """LAMB: NVLAMB variant, apply the trust ratio to excluded (no-decay) tensors too."""


@dataclass
class ScheduleConfig:
    warmup_steps: Optional[int] = setting(None, ge=0)
    """Linear warmup length in optimizer steps.  Alternative to warmup_ratio: setting one (in a
    file over its base, or on the command line over the file) replaces the other."""
    warmup_ratio: Optional[float] = setting(None, ge=0, lt=1)
    """Warmup as a fraction of training.max_steps.  With neither set: 0.01."""
    decay: Literal["poly", "linear", "cosine", "constant"] = "poly"
    """Shape after warmup, measured from the end of warmup so the LR never jumps."""
    power: float = setting(0.5, gt=0)
    """Exponent of the polynomial decay (1.0 equals linear)."""
    min_lr_ratio: float = setting(0.0, ge=0, le=1)
    """Final LR as a fraction of the peak."""


@dataclass
class TrainingConfig:
    micro_batch_size: int = setting(32, gt=0)
    """Sequences per rank per forward/backward."""
    global_batch_size: int = setting(256, gt=0)
    """Sequences per optimizer step over all ranks = micro x accumulation x data-parallel size."""
    grad_accum_steps: Optional[int] = setting(None, gt=0)
    """Micro-batches per optimizer step; None derives it from the batch sizes and world size."""
    max_steps: int = setting(1000, gt=0)
    """Optimizer steps to train."""
    seq_len: int = setting(128, gt=0)
    """Maximum sequence length of the phase (must equal the shards' seq_len)."""
    max_predictions: int = setting(20, gt=0)
    """Upper bound of masked positions per sequence (MLM head computed only there)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; fp16 uses dynamic loss scaling."""
    initial_loss_scale_power: int = 16
    """fp16: the dynamic loss scale starts at 2**this."""
    seed: int = setting(1234, ge=0)
    """Seed of model init, data order, dynamic masking and dropout."""
    max_nonfinite_steps: int = setting(10, gt=0)
    """Stop with an error after this many consecutive steps with a non-finite loss."""
    collective_timeout_s: int = setting(1800, gt=0)
    """Timeout of collective operations, so a dead rank gives an error instead of a hang."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in the backward pass instead of keeping them: the same
    losses, less activation memory (a larger micro batch or seq_len fits), about one more encoder forward
    a step (docs/performance.md)."""


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+grads), 3 (+params)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states in host memory."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in host memory (stage 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = setting(50_000_000, gt=0)
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = setting(50_000_000, gt=0)
    """Elements per parameter all-gather bucket (ZeRO 1 and 2 gather the updated partitions after
    each step)."""


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
    every_steps: int = setting(1000, gt=0)
    """Save every N optimizer steps (and always at the end)."""
    keep_last: int = setting(3, gt=0)
    """Number of most recent checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the latest checkpoint in dir when there is one."""
    init_from: Optional[str] = setting(None, path=True)
    """Start from another run's checkpoint weights (phase 2 from phase 1)."""
    init_optimizer: bool = False
    """With init_from: also load the optimizer state."""
    allow_fingerprint_mismatch: bool = False
    """Resume although data/tokenizer/config fingerprints differ from the checkpoint's."""


@dataclass
class TrackersConfig:
    """Experiment trackers beside TensorBoard (pretrain/trackers.py): the logging section of pretraining and
    of fine-tuning."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that also get every logged scalar (at its step) and the resolved config, from rank
    0: any of ``mlflow``, ``wandb`` (``pip install 'bertforge[trackers]'``).  A run resumed from a checkpoint
    continues the same tracker runs (their ids are in RUN_DIR/trackers.json).  Empty: none."""
    tracker_run_name: Optional[str] = None
    """The run's name in the trackers; None: the name of run_dir (fine-tuning: with ``/seed-N``)."""
    mlflow_tracking_uri: Optional[str] = None
    """Where MLflow keeps runs: a tracking server (``http://host:5000``), ``databricks``, or a local store
    (``file:PATH``, which MLflow 3 opens only with MLFLOW_ALLOW_FILE_STORE=true; ``sqlite:///FILE`` needs the
    full ``mlflow`` package).  None: MLflow's default (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    mlflow_experiment: Optional[str] = None
    """MLflow experiment name, created when missing; None: MLflow's default (MLFLOW_EXPERIMENT_NAME, else
    the Default experiment)."""
    wandb_project: Optional[str] = None
    """W&B project; None: WANDB_PROJECT, else W&B's default."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team); None: WANDB_ENTITY, else the account's default."""
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None
    """W&B mode: ``offline`` writes the run under WANDB_DIR (default ./wandb) for a later ``wandb sync``;
    None: WANDB_MODE, else online (which needs ``wandb login``)."""


@dataclass
class LoggingConfig(TrackersConfig):
    run_dir: str = setting("runs/default", path=True)
    """Root of this run's outputs: TensorBoard events, JSONL log, checkpoints, plots."""
    every_steps: int = setting(10, gt=0)
    """Log training metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    progress_bar: bool = True
    """Rank 0's progress: a bar with ETA when stderr is a terminal; otherwise, or when false, one plain line
    a logging window on stdout (step, loss, lr, seq/s, tok/s, loader wait, ETA), readable in a log file."""
    peak_tflops: Optional[float] = None
    """Device peak TFLOP/s for MFU; None looks it up by device name."""


@dataclass
class EvalConfig:
    every_steps: int = setting(500, ge=0)
    """Held-out evaluation every N optimizer steps, and at the last step (0: never, not even at the end)."""
    max_batches: int = setting(50, ge=0)
    """Held-out batches per evaluation (0: the whole split)."""
    micro_batch_size: Optional[int] = setting(None, gt=0)
    """Evaluation batch size; None uses training.micro_batch_size."""
    downstream: Optional[str] = setting(None, path=True)
    """A fine-tuning suite YAML (as ``python -m pretrain finetune --suite`` takes, e.g.
    configs/finetune/glue.yaml) run on the weights of the run's checkpoints, in the background: rank 0
    starts it as a job of its own once a due checkpoint is saved, training goes on, and each task's score
    is logged as ``downstream/TASK`` (and ``downstream/average``) at the checkpoint's step, in TensorBoard
    beside the MLM curves (pretrain/downstream.py).  None: off."""
    downstream_every_steps: int = setting(0, ge=0)
    """Steps between downstream evaluations (and the last step), a multiple of checkpoint.every_steps;
    0: at every checkpoint."""
    downstream_max_steps: Optional[int] = setting(None, gt=0)
    """The fine-tuning budget of a downstream evaluation: optimizer steps per task and seed (each task's
    training.max_steps); None: each task's own epochs."""


@dataclass
class DistillConfig:
    """``python -m pretrain distill``: a student trained on a frozen teacher's outputs (pretrain/distill.py)."""
    teacher: Optional[str] = setting(None, path=True)
    """The teacher (required by ``pretrain distill``, unused by ``pretrain train``): one of our checkpoints (a
    directory with model.pt and config.yaml, or a checkpoint root with ``latest``) or a transformers directory
    of the BERT family (config.json; as ``pretrain import`` reads).  The student's model section is derived
    from the teacher's (see student, layer_map): a distillation config's ``model`` section is replaced."""
    student: Literal["distilbert", "teacher"] = "distilbert"
    """The student's shape: ``distilbert`` (model.arch distilbert: no token-type embeddings, no pooler or
    sentence head; needs a post-LN BERT teacher) or ``teacher`` (the teacher's arch and layout without the
    sentence head: BERT-shaped for a BERT teacher, RoBERTa-shaped for a RoBERTa one)."""
    layer_map: Optional[list[int]] = None
    """The teacher layer (counted from 0) whose weights initialise each student layer, in order; its length is
    the student's depth.  None: every other layer, 0, 2, 4, ... (half the depth, rounded up), as DistilBERT.
    The embeddings and the MLM head are the teacher's; the student keeps the teacher's width."""
    temperature: float = setting(2.0, gt=0)
    """Softmax temperature T of the soft-target loss (its KL is scaled by T^2)."""
    alpha_ce: float = setting(5.0, ge=0)
    """Weight of the soft-target loss: KL(teacher || student) of the MLM distributions at temperature T,
    averaged over the masked positions."""
    alpha_mlm: float = setting(2.0, ge=0)
    """Weight of the student's own MLM loss (cross-entropy with the masked tokens)."""
    alpha_cos: float = setting(1.0, ge=0)
    """Weight of the cosine embedding loss, 1 - cos(student, teacher) of the last hidden states, averaged
    over the real (not padding) tokens."""
    alpha_mse: float = setting(0.0, ge=0)
    """Weight of the mean squared error between the student's and the teacher's last hidden states over the
    real tokens (averaged over tokens and width; 0: off, as in DistilBERT)."""


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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def grad_accum_steps(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step for this world size (validated by ``validate``)."""
        t = self.training
        if t.grad_accum_steps is not None:
            return t.grad_accum_steps
        return max(1, t.global_batch_size // (t.micro_batch_size * data_parallel_size))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
# Keys that say the same thing two ways: a layer (a child file over its base, the command line
# over the file) that sets one of them replaces the other too; one layer setting both is an error.
ALTERNATIVES = {"schedule": (("warmup_steps", "warmup_ratio"),), "data": (("dir", "sources"),)}


def load_config(path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Load defaults < YAML file (with bases) < ``overrides``; validate; return the Config.

    ``world_size`` (data-parallel size), when known, enables the batch-size product rule.
    """
    try:
        data = settings.read_file(path, ALTERNATIVES) if path else {}
    except ConfigFileError as err:
        raise ConfigError([str(err)]) from None
    if overrides:
        data = settings.merge(data, settings.parse_overrides(overrides, "training.max_steps=100"), ALTERNATIVES)
    return config_from_dict(data, source=path, world_size=world_size)


def config_from_dict(data: dict, source: str | None = None, world_size: int | None = None) -> Config:
    section = data.get("data") if isinstance(data, dict) else None
    raw_sources = section.get("sources") if isinstance(section, dict) else None
    if raw_sources is not None:    # a list of sections, which the config engine's leaf types do not cover
        data = {**data, "data": {k: v for k, v in section.items() if k != "sources"}}
    sources, problems = _sources(raw_sources, section.get("dir") if isinstance(section, dict) else None)
    try:
        cfg = settings.build(Config, data, source=source, rules=RULES, context=(world_size,), warn=WARNINGS)
    except ConfigError as err:
        raise ConfigError(err.problems + problems, source=source) from None
    if problems:
        raise ConfigError(problems, source=source)
    cfg.data.sources = sources
    return cfg


def _sources(raw, data_dir) -> tuple[list[SourceConfig], list[str]]:
    """``data.sources`` built item by item (problems named ``data.sources[i].key``), with their names."""
    if raw is None or raw == []:
        return [], []
    if not isinstance(raw, list):
        return [], [f"data.sources: got {raw!r}, expected a list of {{dir: ..., weight: ...}} mappings"]
    if data_dir:
        return [], [f"data.dir ({data_dir}) and data.sources are both set in one place; they are alternatives: "
                    f"set one (data.dir is one source of weight 1)"]
    sources, indices, problems = [], [], []
    for i, item in enumerate(raw):
        where = f"data.sources[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: got {item!r}, expected a mapping {{dir: ..., weight: ...}}")
            continue
        try:
            source = settings.build(SourceConfig, item)
        except ConfigError as err:
            problems += [f"{where}.{p}" for p in err.problems]
            continue
        if not source.dir:
            problems.append(f"{where}.dir: missing (the source's shard directory or URL)")
            continue
        source.name = source.name or _default_name(source.dir)
        if source.name is None:
            problems.append(f"{where}.name: missing, and the pipe: command {source.dir!r} names no directory "
                            f"before {{name}} to take it from: give the source a name")
            continue
        sources.append(source)
        indices.append(i)
    names = [s.name for s in sources]
    problems += [f"data.sources[{indices[i]}].weight: {sources[i].weight} is too small against the largest "
                 f"weight ({max(s.weight for s in sources)}) to get a share; raise it or leave the source out"
                 for i in negligible([s.weight for s in sources])] if sources else []
    problems += [f"data.sources: two sources are named {n!r}: give them distinct `name`s"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    return sources, problems


def _default_name(location: str) -> Optional[str]:
    """The last part of a source's dir, skipping a final ``shards`` (data_prep writes OUT/shards); of a
    ``pipe:`` command, the last part of the path it names right before ``{name}`` (None when it names
    none: ``pipe:fetch {name}``)."""
    path = location
    if location.startswith("pipe:"):
        head = location[len("pipe:"):].partition("{name}")[0]
        path = head.split()[-1].strip("'\"") if head.strip() and not head[-1].isspace() else ""
        if "/" not in path:
            return None
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if len(parts) > 1 and parts[-1] == "shards":
        parts.pop()
    return parts[-1] if parts else location


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"model": {"hidden_size": 64}}`` -> ``{"model.hidden_size": 64}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def ignored_option_warnings(cfg: Config, static_masking: bool, objective: Optional[str] = None) -> list[str]:
    """Settings the shards make ineffective, and what of the shards the model leaves unused (known once the
    manifest is read: its masking and ``objective``); those that the config alone shows are issued by
    ``load_config`` as ConfigWarning."""
    warnings = []
    if static_masking and cfg.data.mlm_probability is not None:
        warnings.append(f"data.mlm_probability={cfg.data.mlm_probability} has no effect: the shards are statically "
                        "masked (data_prep wrote their masks); it still enters the config fingerprint")
    if objective in ("nsp", "sop") and cfg.model.sentence_head == "none":
        warnings.append(f"the shards are {objective} instances but model.sentence_head is none: their sentence "
                        "labels are ignored (masked LM only)")
    return warnings


# --------------------------------------------------------------------------------------------
# Cross-field rules (value ranges are on the fields); each runs when its keys hold valid values
# --------------------------------------------------------------------------------------------
RULES = settings.Rules()
WARNINGS = settings.Rules()


@RULES.check("model.hidden_size", "model.num_heads")
def _heads_divide_width(cfg: Config, _world_size):
    m = cfg.model
    if m.hidden_size % m.num_heads:
        return (f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}): "
                f"{m.hidden_size} % {m.num_heads} = {m.hidden_size % m.num_heads}")


@RULES.check("model.arch", "model.embedding_size", "model.share_layers", "model.hidden_size")
def _albert_options(cfg: Config, _world_size):
    m = cfg.model
    if m.arch != "albert" and (m.embedding_size not in (None, m.hidden_size) or m.share_layers):
        return "model.embedding_size / model.share_layers are ALBERT options: set model.arch=albert"


@RULES.check("model.arch", "model.sentence_head", "model.layer_norm_position")
def _roberta_distilbert_layout(cfg: Config, _world_size):
    m = cfg.model
    if m.arch in ("roberta", "distilbert") and (m.sentence_head != "none" or m.layer_norm_position != "post"):
        return (f"model.arch={m.arch} is post-LN without a sentence head: got model.sentence_head="
                f"{m.sentence_head}, model.layer_norm_position={m.layer_norm_position} (expected none, post)")


@RULES.check("model.arch", "model.layer_norm_eps")
def _distilbert_eps(cfg: Config, _world_size):
    m = cfg.model
    if m.arch == "distilbert" and m.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        return (f"model.layer_norm_eps: got {m.layer_norm_eps} with model.arch=distilbert, expected "
                f"{DISTILBERT_LAYER_NORM_EPS} "
                f"(transformers' DistilBERT has it built in, so no other value could be exported)")


@RULES.check("model.arch", "model.sentence_head")
def _albert_head(cfg: Config, _world_size):
    if cfg.model.arch == "albert" and cfg.model.sentence_head == "nsp":
        return "model.sentence_head: ALBERT uses 'sop' (or 'none'), got 'nsp'"


@RULES.check("training.seq_len", "model.max_position_embeddings")
def _seq_fits_positions(cfg: Config, _world_size):
    t, m = cfg.training, cfg.model
    if t.seq_len > max_seq_len(m):
        offset = position_offset(m)
        more = f" - {offset} (RoBERTa's positions start at {offset})" if offset else ""
        return (f"training.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                f"({m.max_position_embeddings}){more}")


@RULES.check("training.max_predictions", "training.seq_len")
def _predictions_fit(cfg: Config, _world_size):
    t = cfg.training
    if t.max_predictions > t.seq_len:
        return f"training.max_predictions ({t.max_predictions}) exceeds training.seq_len ({t.seq_len})"


@RULES.check("optimizer.betas")
def _betas(cfg: Config, _world_size):
    b = cfg.optimizer.betas
    if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
        return f"optimizer.betas: got {b!r}, expected two numbers in [0, 1)"


@RULES.check("optimizer.min_trust_ratio", "optimizer.max_trust_ratio")
def _trust_ratio_order(cfg: Config, _world_size):
    o = cfg.optimizer
    if o.min_trust_ratio > o.max_trust_ratio:
        return (f"optimizer.min_trust_ratio ({o.min_trust_ratio}) must be in [0, optimizer.max_trust_ratio "
                f"({o.max_trust_ratio})]")


@RULES.check("schedule.warmup_steps", "schedule.warmup_ratio")
def _one_warmup(cfg: Config, _world_size):
    s = cfg.schedule
    if s.warmup_steps is not None and s.warmup_ratio is not None:
        return (f"schedule.warmup_steps ({s.warmup_steps}) and schedule.warmup_ratio ({s.warmup_ratio}) are both "
                f"set in one place; they are alternatives: set one")


@RULES.check("schedule.warmup_steps", "training.max_steps")
def _warmup_shorter_than_training(cfg: Config, _world_size):
    s, t = cfg.schedule, cfg.training
    if s.warmup_steps is not None and s.warmup_steps >= t.max_steps:
        return f"schedule.warmup_steps ({s.warmup_steps}) must be below training.max_steps ({t.max_steps})"


@RULES.check("zero.offload_params", "zero.stage")
def _offload_params_stage(cfg: Config, _world_size):
    if cfg.zero.offload_params != "none" and cfg.zero.stage != 3:
        return f"zero.offload_params=cpu needs zero.stage=3 (got stage {cfg.zero.stage})"


@RULES.check("zero.offload_optimizer", "zero.stage")
def _offload_optimizer_stage(cfg: Config, _world_size):
    if cfg.zero.offload_optimizer != "none" and cfg.zero.stage == 0:
        return "zero.offload_optimizer=cpu needs zero.stage >= 1"


@RULES.check("eval.downstream_every_steps", "checkpoint.every_steps")
def _downstream_at_checkpoints(cfg: Config, _world_size):
    every, saved = cfg.eval.downstream_every_steps, cfg.checkpoint.every_steps
    if every % saved:
        return (f"eval.downstream_every_steps ({every}) must be a multiple of checkpoint.every_steps ({saved}): "
                "downstream evaluations run on the checkpoints' weights")


@RULES.check("eval.downstream")
def _downstream_suite(cfg: Config, _world_size):
    """The suite file and every task's config, checked before training starts."""
    if not cfg.eval.downstream:
        return None
    from pretrain.finetune.suite import SuiteError, suite_configs
    try:
        suite_configs(cfg.eval.downstream, [], {"model.checkpoint": "(each checkpoint's weights)"}, out="")
    except SuiteError as err:
        return [f"eval.downstream: {line}" for line in str(err).splitlines()]


@RULES.check("logging.trackers")
def _trackers(cfg: Config, _world_size):
    """Known names, each once (pretrain/trackers.py has the list; the commands check the packages)."""
    if not cfg.logging.trackers:
        return None
    from pretrain.trackers import config_problems
    return config_problems(cfg.logging.trackers)


@RULES.check("training.micro_batch_size", "training.global_batch_size", "training.grad_accum_steps")
def _batch_product(cfg: Config, world_size: int | None):
    t = cfg.training
    mb, gb, acc = t.micro_batch_size, t.global_batch_size, t.grad_accum_steps
    if world_size is None:
        if gb % mb:
            return f"training.global_batch_size ({gb}) must be a multiple of training.micro_batch_size ({mb})"
        if acc is not None and gb % (mb * acc):
            return (f"training.global_batch_size ({gb}) must be a multiple of micro_batch_size x "
                    f"grad_accum_steps ({mb} x {acc} = {mb * acc})")
        return None
    if acc is None:
        if gb % (mb * world_size):
            return (f"training.global_batch_size must equal micro_batch_size x grad_accum_steps x data-parallel "
                    f"size, but {gb} is not a multiple of {mb} x {world_size} = {mb * world_size}")
        return None
    if mb * acc * world_size != gb:
        return (f"training.global_batch_size must equal micro_batch_size x grad_accum_steps x data-parallel size: "
                f"{mb} x {acc} x {world_size} = {mb * acc * world_size} != {gb}")
    return None


@RULES.check("distill.layer_map")
def _layer_map(cfg: Config, _world_size):
    layers = cfg.distill.layer_map
    if layers is not None and (not layers or min(layers) < 0):
        return (f"distill.layer_map: got {layers!r}, expected a non-empty list of teacher layers (integers >= 0, "
                f"one per student layer), or null for every other layer")


DISTILL_WEIGHTS = ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse")


@RULES.check(*(f"distill.{k}" for k in DISTILL_WEIGHTS))
def _some_distill_loss(cfg: Config, _world_size):
    if not any(getattr(cfg.distill, k) for k in DISTILL_WEIGHTS):
        return f"distill.{', '.join(DISTILL_WEIGHTS)}: all are 0, so there is no loss to train on: set one above 0"


LAMB_ONLY = ("bias_correction", "max_trust_ratio", "min_trust_ratio", "nvlamb")


@WARNINGS.check("optimizer.name", *(f"optimizer.{k}" for k in LAMB_ONLY))
def _lamb_options_with_adamw(cfg: Config, _world_size):
    o, default = cfg.optimizer, OptimizerConfig()
    if o.name == "lamb":
        return None
    return [f"optimizer.{k}={yaml.safe_dump(getattr(o, k)).splitlines()[0]} has no effect: it is a LAMB option "
            f"and optimizer.name={o.name}" for k in LAMB_ONLY if getattr(o, k) != getattr(default, k)]


@WARNINGS.check("model.arch", "model.type_vocab_size")
def _token_types_without_a_table(cfg: Config, _world_size):
    m = cfg.model
    if m.arch == "distilbert" and m.type_vocab_size != ModelConfig().type_vocab_size:
        return (f"model.type_vocab_size={m.type_vocab_size} has no effect: model.arch=distilbert has no "
                "token-type embeddings (segment ids are ignored)")


@WARNINGS.check("data.packing", "data.max_instances_per_row")
def _row_cap_without_packing(cfg: Config, _world_size):
    d = cfg.data
    if not d.packing and d.max_instances_per_row != DataConfig().max_instances_per_row:
        return (f"data.max_instances_per_row={d.max_instances_per_row} has no effect: it caps packed rows and "
                "data.packing=false")
