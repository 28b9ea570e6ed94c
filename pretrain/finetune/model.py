"""Task models for fine-tuning: our BERT-family encoder and one output head, as HF's task classes.

    task       head (parameter names)                                  loss (labels)
    sequence   pooler (dense + tanh on [CLS]; DistilBERT: + ReLU),      cross-entropy (class ids), or MSE
               dropout, classifier [num_labels, H]                      (problem_type regression, num_labels 1)
    token      dropout, classifier [num_labels, H] on every token       cross-entropy, IGNORE_INDEX skipped
    qa         (DistilBERT: dropout), qa_outputs [2, H] -> start / end   mean of the start and end
               logits                                                   cross-entropies (positions)

The encoder is BertForPretraining's (its modules under the same names ``embeddings``, ``encoder``,
``pooler``, so our checkpoints load by name and pretrain.hf's key map applies); the MLM and sentence
heads are not part of it.  Heads follow transformers' Bert/MegatronBert/Albert/Roberta/DistilBert
...ForSequenceClassification, ...ForTokenClassification and ...ForQuestionAnswering (same structure,
dropout and losses; QA has no head dropout there, nor here, but DistilBERT's qa_dropout; RoBERTa's
sequence head also drops out before the pooler's dense, as its RobertaClassificationHead does;
DistilBERT's sequence head pools with pre_classifier + ReLU, not tanh), so that
pretrain.hf.export_finetuned writes them and HF's logits equal ours.  New head weights start as HF's: normal(0, initializer_range), biases 0.

:func:`from_pretrained` starts from our checkpoint (what pretrain.weights.load_weights reads) or a
transformers directory (pretrain.hf.read_hf_weights); :func:`save_finetuned` writes our checkpoint
of a fine-tuned model, its head recorded in extra.json so that from_pretrained restores it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.masking import IGNORE_INDEX
from pretrain.config import Config, KernelsConfig, ModelConfig
from pretrain.model.bert import VOCAB_KEYS, BertForPretraining, pad_vocab, trim_vocab

TASKS = ("sequence", "token", "qa")
PROBLEM_TYPES = ("single_label_classification", "regression")
HEAD_KEY = "finetune_head"
"""The key of extra.json (our checkpoints) that records a fine-tuned model's HeadConfig."""


DISTILBERT_SEQ_CLASSIF_DROPOUT = 0.2
"""transformers' DistilBertConfig default dropout before a sequence head's classifier (seq_classif_dropout)."""


@dataclass
class HeadConfig:
    """The task head of a FinetuneModel (resolve_head fills the fields left None)."""
    task: Literal["sequence", "token", "qa"]
    """``sequence``: one prediction per text (pair) from the pooled [CLS] state; ``token``: one per
    token; ``qa``: start and end logits of an answer span over the tokens."""
    num_labels: Optional[int] = None
    """Classes (1 for regression); None: len(labels); qa always has 2 (start, end)."""
    labels: Optional[list[str]] = None
    """Class names by id (the export's id2label); None: LABEL_0, LABEL_1, ... as transformers names them."""
    problem_type: Optional[str] = None
    """sequence only: single_label_classification (cross-entropy) or regression (MSE, num_labels 1);
    None: regression when num_labels is 1, as transformers decides."""
    dropout: Optional[float] = None
    """Dropout before the output layer; None: the model's hidden_dropout (transformers'
    classifier_dropout=None), for arch distilbert's sequence head 0.2 (DistilBertConfig's seq_classif_dropout
    default).  qa has none (transformers' QA classes have none), but for arch distilbert
    (DistilBertForQuestionAnswering's qa_dropout)."""


def resolve_head(head: HeadConfig, m: ModelConfig) -> HeadConfig:
    """``head`` with every field filled in, or ValueError listing every problem."""
    problems = []
    if head.task not in TASKS:
        raise ValueError(f"task: got {head.task!r}, expected one of {', '.join(TASKS)}")
    labels = list(head.labels) if head.labels is not None else None
    num_labels = head.num_labels if head.num_labels is not None else (len(labels) if labels else None)
    qa_dropout = m.arch == "distilbert"    # DistilBertForQuestionAnswering alone drops out before qa_outputs
    if head.task == "qa":
        num_labels = 2 if num_labels is None else num_labels
        if num_labels != 2:
            problems.append(f"num_labels: a qa head has 2 outputs (start, end), got {num_labels}")
        if head.dropout and not qa_dropout:
            problems.append(f"dropout: a qa head has no dropout (as transformers' ...ForQuestionAnswering), "
                            f"got {head.dropout}")
        if head.problem_type is not None:
            problems.append(f"problem_type: only for task sequence, got {head.problem_type!r}")
    elif num_labels is None:
        problems.append(f"num_labels: required for task {head.task} (or labels, the class names)")
    elif num_labels < 1:
        problems.append(f"num_labels: must be at least 1, got {num_labels}")
    problem_type = head.problem_type
    if head.task == "sequence" and num_labels:
        problem_type = problem_type or ("regression" if num_labels == 1 else "single_label_classification")
        if problem_type not in PROBLEM_TYPES:
            problems.append(f"problem_type: got {problem_type!r}, expected one of {', '.join(PROBLEM_TYPES)}")
        elif (problem_type == "regression") != (num_labels == 1):
            problems.append(f"problem_type {problem_type} with num_labels={num_labels}: regression has exactly "
                            "one output, classification at least two")
    elif head.task == "token" and problem_type is not None:
        problems.append(f"problem_type: only for task sequence, got {problem_type!r}")
    if labels is not None and num_labels is not None and len(labels) != num_labels:
        problems.append(f"labels: {len(labels)} names for num_labels={num_labels}")
    if labels is not None and len(set(labels)) != len(labels):
        problems.append(f"labels: names must be distinct, got {labels}")
    default = DISTILBERT_SEQ_CLASSIF_DROPOUT if m.arch == "distilbert" and head.task == "sequence" else m.hidden_dropout
    dropout = 0.0 if head.task == "qa" and not qa_dropout else (default if head.dropout is None else head.dropout)
    if not 0 <= dropout < 1:
        problems.append(f"dropout: must be in [0, 1), got {dropout}")
    if problems:
        raise ValueError("fine-tuning head: " + "; ".join(problems))
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    return HeadConfig(head.task, num_labels, labels, problem_type, float(dropout))


@dataclass
class FinetuneOutput:
    """logits: [B, num_labels] (sequence) or [B, S, num_labels] (token); start_logits / end_logits: [B, S]
    (qa).  loss: when labels (qa: start and end positions) are given."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    start_logits: Optional[torch.Tensor] = None
    end_logits: Optional[torch.Tensor] = None


class FinetuneModel(nn.Module):
    """Our encoder + the head of ``head.task`` (see the module docstring)."""

    # The encoder is BertForPretraining's, code and all: its encode() reads config, kernels, unpad,
    # embeddings and encoder, which this class has under the same names (fine-tuning batches are padded,
    # one example a row: encode() never reaches its packed-only jagged path).
    unpad: bool = False
    encode = BertForPretraining.encode
    _init_weights = BertForPretraining._init_weights

    def __init__(self, cfg: ModelConfig, head: HeadConfig, kernels: KernelsConfig | None = None):
        super().__init__()
        self.head = resolve_head(head, cfg)
        backbone = BertForPretraining(dataclasses.replace(cfg, sentence_head="none"), kernels)  # BERT init
        self.config, self.kernels, self.unpad = cfg, backbone.kernels, backbone.unpad
        self.embeddings, self.encoder = backbone.embeddings, backbone.encoder   # its MLM head is dropped
        hidden = cfg.hidden_size
        task = self.head.task
        # As transformers: only the sequence head pools; token and qa models have no pooler.
        self.pooler = nn.Linear(hidden, hidden) if task == "sequence" else None
        self.dropout = nn.Dropout(self.head.dropout) if task != "qa" or cfg.arch == "distilbert" else None
        if task == "qa":
            self.qa_outputs = nn.Linear(hidden, 2)
        else:
            self.classifier = nn.Linear(hidden, self.head.num_labels)
        for name in self.head_modules():
            self.get_submodule(name).apply(self._init_weights)

    def head_modules(self) -> tuple[str, ...]:
        """Modules not in a pretraining checkpoint's encoder: the pooler (sequence) and the output layer."""
        task = self.head.task
        return {"sequence": ("pooler", "classifier"), "token": ("classifier",), "qa": ("qa_outputs",)}[task]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                start_positions=None, end_positions=None) -> FinetuneOutput:
        """A padded batch (pretrain.finetune.features.collate's keys); the loss when its targets are given."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.head.task == "qa":
            if self.dropout is not None:
                hidden = self.dropout(hidden)
            start_logits, end_logits = self.qa_outputs(hidden).unbind(dim=-1)
            loss = None
            if start_positions is not None and end_positions is not None:
                loss = span_loss(start_logits, end_logits, start_positions, end_positions)
            return FinetuneOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)
        if self.head.task == "sequence":
            first = hidden[:, 0]
            if self.config.arch == "roberta":      # RobertaClassificationHead drops out before its dense too
                first = self.dropout(first)
            pooled = self.pooler(first)     # DistilBERT's pre_classifier is followed by a ReLU, BERT's pooler a tanh
            features = torch.relu(pooled) if self.config.arch == "distilbert" else torch.tanh(pooled)
        else:
            features = hidden
        logits = self.classifier(self.dropout(features))
        if labels is None:
            return FinetuneOutput(logits=logits)
        if self.head.problem_type == "regression":
            return FinetuneOutput(loss=regression_loss(logits, labels), logits=logits)
        return FinetuneOutput(loss=classification_loss(logits, labels), logits=logits)

    # ---- the consolidated weights format (vocabulary rows trimmed), as BertForPretraining ----
    def consolidated_state_dict(self) -> dict:
        """fp32 CPU copy of the state dict with the vocabulary padding removed."""
        return trim_vocab(self.state_dict(), self.config)

    def load_consolidated_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a consolidated state dict, re-padding the vocabulary rows with zeros."""
        return self.load_state_dict(pad_vocab(state_dict, self.config), strict=strict)


def classification_loss(logits, labels):
    """Mean cross-entropy over the labels that are not IGNORE_INDEX (0 when there are none, where
    torch's mean would be NaN), in fp32; logits [..., C], labels [...]."""
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)


def regression_loss(logits, labels):
    """MSE of the single output [B, 1] against float labels [B], in fp32."""
    return F.mse_loss(logits.reshape(-1).float(), labels.reshape(-1).float())


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """As transformers' QA classes: (CE(start) + CE(end)) / 2 over positions [B]; a position outside the
    sequence (< 0 or >= S) is clamped to S and ignored.  0 where every position is ignored (HF: NaN)."""
    seq_len = start_logits.size(1)
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        positions = positions.reshape(-1).clamp(0, seq_len)
        total = F.cross_entropy(logits.float(), positions, ignore_index=seq_len, reduction="sum")
        losses.append(total / (positions != seq_len).sum().clamp(min=1))
    return (losses[0] + losses[1]) / 2


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What from_pretrained did: the source, the weights it initialized and those it left unused."""
    source: Literal["checkpoint", "huggingface"]
    path: str
    new: list[str] = field(default_factory=list)
    """Our parameter names initialized fresh: the output layer (unless the source is a fine-tuned model of
    the same task), the pooler of a sequence head when the source has none."""
    unused: list[str] = field(default_factory=list)
    """The source's weights left unused: our names where they have one (the pooler under a token or qa
    head, another task's output layer), else the source's (the MLM and sentence heads)."""
    tokenizer_dir: Optional[str] = None
    """The source's tokenizer (pretrain.hf.checkpoint_tokenizer_dir; an HF directory's own files), or None."""


def from_pretrained(path: str, task: str | None = None, num_labels: int | None = None, *,
                    labels: list[str] | None = None, problem_type: str | None = None,
                    head_dropout: float | None = None, new_head: bool = False, random_init: bool = False,
                    kernels: KernelsConfig | None = None) -> tuple[FinetuneModel, LoadReport]:
    """A FinetuneModel (eval mode, fp32, CPU) and its LoadReport, from our checkpoint directory (or its
    model.pt, or a root with ``latest``) or a transformers directory (pretrain.hf.read_hf_weights).

    A fine-tuned source of the same task brings its head: num_labels, labels, problem_type and dropout
    default to its own, and its output layer loads (a different shape is an error; ``new_head`` starts a
    fresh head instead).  Otherwise ``task`` is required, and num_labels (or labels) for sequence and token.
    ``random_init``: the source's architecture, head settings and tokenizer, but none of its weights: every
    weight keeps BERT's initialisation (from the torch seed), the baseline that shows what pretraining is
    worth.  ``kernels``: the fine-tuning run's kernels section (None: the PyTorch defaults).
    """
    from pretrain import hf
    if hf.is_hf_dir(path):
        src = hf.read_hf_weights(path)
        m, source_head, weights, unused = src.model, src.head, src.state_dict, src.unused
        report = LoadReport("huggingface", path, tokenizer_dir=src.tokenizer_dir)
    else:
        m, source_head, weights, unused, report = _read_checkpoint(path)
    task = task or (source_head or {}).get("task")
    reuse = source_head is not None and not new_head and task == source_head["task"]
    given = {"num_labels": num_labels, "labels": labels, "problem_type": problem_type, "dropout": head_dropout}
    model = FinetuneModel(m, _head(path, task, source_head if reuse else None, given), kernels)
    head_layers = tuple(p + "." for p in model.head_modules() if p != "pooler")
    if not reuse:  # another task's (or a discarded) output layer
        unused += [k for k in weights if k.startswith(("classifier.", "qa_outputs."))]
        weights = {k: v for k, v in weights.items() if not k.startswith(("classifier.", "qa_outputs."))}
    own = model.state_dict()
    unused += [k for k in weights if k not in own]
    weights = {k: v for k, v in weights.items() if k in own}
    _check_shapes(weights, model, path, head_layers)
    if random_init:
        unused, weights = sorted(unused + list(weights)), {}
    missing = [k for k in own if k not in weights]
    encoder_missing = [k for k in missing if not k.startswith(("pooler.",) + head_layers)]
    if encoder_missing and not random_init:
        raise ValueError(f"{path}: lacks {len(encoder_missing)} encoder weight(s): {', '.join(encoder_missing[:5])}")
    model.load_consolidated_state_dict(weights, strict=False)
    report.new, report.unused = missing, sorted(unused)
    return model.eval(), report


def _head(path: str, task: str | None, source_head: dict | None, given: dict) -> HeadConfig:
    """The head: the source's (when it is reused) with the ``given`` settings that are not None over it."""
    if source_head is None:
        if task is None:
            raise ValueError(f"{path}: not a fine-tuned model, so the task must be given (one of {', '.join(TASKS)})")
        return HeadConfig(task, **{k: v for k, v in given.items() if v is not None})
    if given["num_labels"] not in (None, source_head["num_labels"]):
        raise ValueError(f"{path}: a fine-tuned {source_head['task']} model with num_labels="
                         f"{source_head['num_labels']}, not {given['num_labels']} (new_head=True for a fresh head)")
    settings = dict(source_head, **{k: v for k, v in given.items() if v is not None})
    if given["labels"] is not None:
        settings["num_labels"] = len(given["labels"])
    return HeadConfig(**settings)


def _read_checkpoint(path: str):
    from pretrain.hf import checkpoint_tokenizer_dir
    from pretrain.weights import load_weights, resolve_checkpoint_dir
    ckpt_dir = resolve_checkpoint_dir(path)
    config, state_dict, extra = load_weights(ckpt_dir)
    source_head = extra.get(HEAD_KEY)
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    if source_head is not None and (not isinstance(source_head, dict) or source_head.get("task") not in TASKS
                                    or not set(source_head) <= fields):
        raise ValueError(f"{ckpt_dir}: extra.json {HEAD_KEY} is not a fine-tuning head: {source_head!r}")
    report = LoadReport("checkpoint", path, tokenizer_dir=checkpoint_tokenizer_dir(ckpt_dir, config, extra))
    return config.model, source_head, dict(state_dict), [], report


def _check_shapes(weights: dict, model: FinetuneModel, path: str, head_layers: tuple) -> None:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key in VOCAB_KEYS:
        if key in shapes:
            shapes[key][0] = model.config.vocab_size   # consolidated: the vocabulary unpadded
    wrong = [k for k, v in weights.items() if list(v.shape) != shapes[k]]
    if not wrong:
        return
    shown = ", ".join(f"{k} {list(weights[k].shape)} (the model's: {shapes[k]})" for k in wrong[:5])
    hint = " (pass num_labels to match, or new_head=True for a fresh head)" if \
        all(k.startswith(head_layers) for k in wrong) else ""
    raise ValueError(f"{path}: weight shapes differ from the model's: {shown}{hint}")


def save_finetuned(model: FinetuneModel, ckpt_dir: str, config: Config | None = None,
                   extra: dict | None = None) -> None:
    """Our checkpoint of a fine-tuned model (pretrain.weights.save_weights), its HeadConfig in extra.json
    so that from_pretrained(ckpt_dir) restores the head.  ``config``: the run's (config.model must be the
    model's); None: one holding only the model section."""
    from pretrain.hf import model_only_config
    from pretrain.weights import save_weights
    if config is None:
        config = model_only_config(model.config, source="save_finetuned")
    elif config.model != model.config:
        raise ValueError("save_finetuned: config.model differs from the model's config")
    extra = dict(extra or {}, **{HEAD_KEY: dataclasses.asdict(model.head)})
    save_weights(ckpt_dir, config, model.state_dict(), extra)
