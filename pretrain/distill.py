"""Knowledge distillation (``python -m pretrain distill``): a student trained on a frozen teacher's outputs,
by the pretraining trainer (pretrain/trainer.py: its loop, checkpoints, resume, signals, metrics, evaluation).

DistilBERT's recipe (Sanh et al. 2019, arXiv:1910.01108; huggingface/transformers
examples/research_projects/distillation): the student is the teacher's width with every other layer, its
weights taken from the teacher's (``distill.layer_map``), and it learns from

    loss = alpha_ce  * T^2 KL(softmax(teacher / T) || softmax(student / T))   MLM logits, masked positions
         + alpha_mlm * cross-entropy(student, masked tokens)                    its own MLM loss
         + alpha_cos * (1 - cos(student, teacher))                             last hidden states, real tokens
         + alpha_mse * mean((student - teacher)^2)                             the same states (optional)

each term averaged over its positions (the KL per masked position, as DistilBERT's ``batchmean``).  Both
models' logits are computed at the masked positions only, by our sparse MLM head: the reference
implementation materialises the teacher's logits at every position.

The model the engine trains is a :class:`Distiller`: the student's modules registered as its own (its state
dict, checkpoints and model.pt are the student's, by the student's names, so export, evaluation and
fine-tuning read them as any checkpoint) and the loss.  The teacher is held beside them, unregistered:
DeepSpeed never partitions, checkpoints or hands it to the optimizer; it sits on the same device in the
training precision, in eval mode (no dropout), without gradients.  Its identity, the sha256 of its
weights, is a fingerprint of the run's checkpoints: a resume against another teacher is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import RULES, Config, ConfigError, DistillConfig, ModelConfig
from pretrain.model import IGNORE_INDEX, BertForPretraining, PretrainOutput, build_model
from pretrain.model.bert import loss_and_accuracy
from pretrain.trainer import Objective
from pretrain.weights import CheckpointError

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# The teacher and the student's shape
# --------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    """A teacher as read from disk: its model section, consolidated fp32 weights and identity."""
    model: ModelConfig
    state_dict: dict
    identity: dict
    """{"sha256": of its weights (names, shapes and fp32 values), "path": where it was read}: a fingerprint."""
    tokenizer: str | None = None
    """The hash of the tokenizer our checkpoint records it was trained with (None: unknown, e.g. a transformers
    directory)."""
    tokens: dict | None = None
    """{token: id} of a transformers directory's tokenizer files (None: ours, or a directory without them)."""


def load_teacher(path: str) -> Teacher:
    """Our checkpoint (pretrain.weights.load_weights) or a transformers directory (read as ``pretrain import``
    reads it, into a temporary checkpoint): weights only, nothing unpickled but tensors.  A path that holds
    neither is a CheckpointError naming ``distill.teacher``."""
    from pretrain.hf import import_hf, is_hf_dir
    from pretrain.weights import load_weights, resolve_checkpoint_dir
    try:
        if is_hf_dir(path):
            with tempfile.TemporaryDirectory(prefix="teacher-") as tmp:
                import_hf(path, tmp)
                config, state_dict, imported = load_weights(tmp)
                tokens = token_ids(imported.get("tokenizer_dir"))
            where = os.path.abspath(path)
            extra = {}
        else:
            config, state_dict, extra = load_weights(path)
            where, tokens = os.path.abspath(resolve_checkpoint_dir(path)), None
    except (OSError, ValueError, ConfigError) as err:   # missing, not a checkpoint, unsupported HF class
        raise CheckpointError(f"distill.teacher: {err}") from None
    return Teacher(config.model, state_dict, {"sha256": weights_sha256(state_dict), "path": where},
                   (extra.get("fingerprints") or {}).get("tokenizer"), tokens)


def token_ids(tokenizer_dir: str | None) -> dict | None:
    """{token: id} of a tokenizer directory's tokenizer.json (or vocab.txt); None without either."""
    from pathlib import Path

    from data_prep.vocab import read_vocab_txt
    if not tokenizer_dir:
        return None
    found = Path(tokenizer_dir)
    if (found / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(found / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return read_vocab_txt(found / "vocab.txt") if (found / "vocab.txt").is_file() else None


def check_data(teacher: Teacher, shards) -> None:
    """Refuse shards the teacher cannot read: of another tokenizer than the one our checkpoint records, or
    (a transformers directory) a tokenizer whose tokens have other ids than the directory's own tokenizer
    files give them.  A transformers directory without tokenizer files is checked by vocabulary size only
    (pretrain.data.open_split: the shards' must fit the model's).  ``shards``: the training Mixture."""
    from pretrain.data import DataError

    where = f"distill.teacher: {teacher.identity['path']}"
    if teacher.tokenizer is not None and teacher.tokenizer != shards.tokenizer_hash:
        raise DataError(f"{where} was trained with tokenizer {teacher.tokenizer}, but the shards' tokenizer is "
                        f"{shards.tokenizer_hash}: distil on shards of the teacher's tokenizer")
    if teacher.tokenizer is None and teacher.tokens is not None:
        ours = token_ids(shards.tokenizer_dir) or {}
        other = sorted(t for t, i in ours.items() if teacher.tokens.get(t) != i)
        if other:
            raise DataError(f"{where}: its tokenizer gives {len(other)} of the shards' {len(ours)} tokens other ids "
                            f"(e.g. {other[0]!r}: {teacher.tokens.get(other[0])} vs {ours[other[0]]}): distil on "
                            f"shards of the teacher's tokenizer")


def weights_sha256(state_dict: dict) -> str:
    """sha256 of a consolidated state dict's names, shapes and fp32 values (whatever file it came from)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().float().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def layer_map(teacher: ModelConfig, d: DistillConfig) -> list[int]:
    """The teacher layer of each student layer: ``distill.layer_map``, or every other one (0, 2, 4, ...)."""
    if teacher.share_layers:
        raise ConfigError(["distill.teacher: an ALBERT teacher with model.share_layers has a single layer of "
                           "weights: there are no layers to choose a student's from"])
    layers = list(range(0, teacher.num_layers, 2)) if d.layer_map is None else list(d.layer_map)
    missing = [i for i in layers if i >= teacher.num_layers]
    if missing:
        raise ConfigError([f"distill.layer_map: teacher layer(s) {missing} do not exist: the teacher has "
                           f"{teacher.num_layers} layers (0 to {teacher.num_layers - 1})"])
    return layers


def student_config(teacher: ModelConfig, d: DistillConfig) -> ModelConfig:
    """The teacher's model section with the student's depth, shape (``distill.student``) and no sentence head."""
    depth = len(layer_map(teacher, d))
    if d.student == "teacher":
        return dataclasses.replace(teacher, num_layers=depth, sentence_head="none")
    if teacher.arch not in ("bert", "distilbert") or teacher.layer_norm_position != "post":
        raise ConfigError([f"distill.student=distilbert needs a post-LN BERT teacher, got model.arch={teacher.arch} "
                           f"with layer_norm_position={teacher.layer_norm_position}: set distill.student=teacher "
                           f"for a student of the teacher's shape"])
    return dataclasses.replace(teacher, arch="distilbert", num_layers=depth, sentence_head="none",
                               type_vocab_size=ModelConfig().type_vocab_size)   # distilbert has no such table


def student_weights(teacher_weights: dict, layers: list[int], student_keys) -> dict:
    """The student's consolidated weights taken from the teacher's: student layer i from teacher layer
    layers[i], everything else (embeddings, MLM head, a pre-LN final norm) by its own name."""
    out = {}
    for key in student_keys:
        source = key
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            source = f"encoder.layers.{layers[int(index)]}.{rest}"
        if source not in teacher_weights:
            raise CheckpointError(f"distill.teacher: its weights lack {source} (for the student's {key})")
        out[key] = teacher_weights[source]
    return out


def distill_config(cfg: Config, teacher: Teacher, world_size: int | None = None) -> Config:
    """``cfg`` with the student derived from the teacher as its model section, the rules checked again."""
    out = dataclasses.replace(cfg, model=student_config(teacher.model, cfg.distill))
    problems = RULES.run(out, set(), (world_size,))
    if problems:
        raise ConfigError([f"with the student derived from distill.teacher: {p}" for p in problems])
    return out


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
@dataclass
class DistillOutput(PretrainOutput):
    """PretrainOutput (loss: the weighted sum; mlm_*: the student's MLM) with the unweighted components."""
    components: dict = field(default_factory=dict)
    """0-dim tensors by name: ce, mlm, cos, and mse where alpha_mse > 0."""


def distillation_output(logits, teacher_logits, labels, hidden, teacher_hidden, real,
                        d: DistillConfig) -> DistillOutput:
    """The losses of one micro-batch.  ``logits`` / ``teacher_logits`` [N, vocab] at the masked positions, one
    row per entry of ``labels`` (-100: a padding entry); ``hidden`` / ``teacher_hidden`` [B, S, H]; ``real``
    [B, S] the real tokens (None: all).  No host sync: padding entries are weighted out, not indexed out."""
    out = DistillOutput(mlm_logits=logits)
    out.mlm_loss, out.mlm_correct, out.mlm_count = loss_and_accuracy(logits, labels)
    masked = (labels.reshape(-1) != IGNORE_INDEX).float()
    t = d.temperature
    log_p = F.log_softmax(logits.float() / t, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)                        # KL(teacher || student) per row
    components = {"ce": (kl * masked).sum() / masked.sum().clamp(min=1) * t * t, "mlm": out.mlm_loss}
    tokens = torch.ones(hidden.shape[:2], device=hidden.device) if real is None else real.float()
    count = tokens.sum().clamp(min=1)
    hidden, teacher_hidden = hidden.float(), teacher_hidden.float()
    cos = F.cosine_similarity(hidden, teacher_hidden, dim=-1)
    components["cos"] = ((1 - cos) * tokens).sum() / count
    if d.alpha_mse:
        components["mse"] = ((hidden - teacher_hidden).pow(2).mean(-1) * tokens).sum() / count
    out.components = components
    out.loss = sum(getattr(d, f"alpha_{name}") * value for name, value in components.items())
    return out


class Distiller(nn.Module):
    """The student's modules (registered as this module's own, under the student's names) and the distillation
    loss; the frozen teacher beside them, unregistered.  In eval mode (held-out evaluation) it is the student
    alone: its MLM metrics, the teacher not run."""

    def __init__(self, student: BertForPretraining, teacher: BertForPretraining, settings: DistillConfig):
        super().__init__()
        if list(student.parameters(recurse=False)):
            raise TypeError("Distiller: the student must hold its parameters in submodules")
        for name, module in student.named_children():
            self.add_module(name, module)
        self._models = (student, teacher)       # a tuple: nn.Module registers neither
        self.settings = settings

    @property
    def student(self) -> BertForPretraining:
        return self._models[0]

    @property
    def teacher(self) -> BertForPretraining:
        return self._models[1]

    def consolidated_state_dict(self) -> dict:
        return self.student.consolidated_state_dict()

    def load_consolidated_state_dict(self, state_dict: dict, strict: bool = True):
        return self.student.load_consolidated_state_dict(state_dict, strict=strict)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, masked_lm_positions=None,
                masked_lm_labels=None, sentence_labels=None, segment_ids=None, position_ids=None,
                cls_positions=None, cu_seqlens=None) -> PretrainOutput:
        """A pretraining batch; ``sentence_labels`` are ignored (no sentence objective)."""
        inputs = dict(attention_mask=attention_mask, token_type_ids=token_type_ids, segment_ids=segment_ids,
                      position_ids=position_ids, cu_seqlens=cu_seqlens)
        if not self.training:
            return self.student(input_ids, masked_lm_positions=masked_lm_positions,
                                masked_lm_labels=masked_lm_labels, cls_positions=cls_positions, **inputs)
        packed = cls_positions is not None
        hidden = self.student.encode(input_ids, **inputs)
        logits = self.student.mlm_logits(hidden, masked_lm_positions, packed=packed)
        with torch.no_grad():
            teacher_hidden = self.teacher.encode(input_ids, **inputs)
            teacher_logits = self.teacher.mlm_logits(teacher_hidden, masked_lm_positions, packed=packed)
        real = segment_ids > 0 if segment_ids is not None else attention_mask
        return distillation_output(logits, teacher_logits, masked_lm_labels, hidden, teacher_hidden, real,
                                   self.settings)


def distill_stats(out: DistillOutput, loss: torch.Tensor) -> dict:
    """Pretraining's metric sums and each loss component's, ``loss_<name>_sum`` (logged as train/loss_<name>)."""
    from pretrain.engine import output_stats      # the engine's default: pretraining's sums
    stats = output_stats(out, loss)
    stats.update({f"loss_{name}_sum": value.detach().float() for name, value in out.components.items()})
    return stats


# --------------------------------------------------------------------------------------------
# What the command hands the trainer
# --------------------------------------------------------------------------------------------
def frozen_teacher(teacher: Teacher, cfg: Config, device: torch.device) -> BertForPretraining:
    """The teacher's model on ``device`` in the training precision, in eval mode, without gradients."""
    model = build_model(teacher.model, cfg.kernels)
    model.load_consolidated_state_dict(teacher.state_dict)
    model.to(device=device, dtype=PRECISION_DTYPES[cfg.training.precision])
    return model.eval().requires_grad_(False)


def objective(cfg: Config, teacher: Teacher) -> Objective:
    """The trainer's Objective of a distillation run of ``cfg`` (distill_config's) from ``teacher``."""
    layers = layer_map(teacher.model, cfg.distill)

    def wrap(student: nn.Module, device: torch.device) -> Distiller:
        student.load_consolidated_state_dict(student_weights(teacher.state_dict, layers, student.state_dict()))
        distiller = Distiller(student, frozen_teacher(teacher, cfg, device), cfg.distill)
        teacher.state_dict = None     # the frozen copy is all the run needs: the fp32 host copy goes
        return distiller

    return Objective(wrap=wrap, stats=distill_stats, fingerprints={"teacher": teacher.identity},
                     check_data=lambda shards: check_data(teacher, shards))


def prepare(cfg: Config, world_size: int | None = None) -> tuple[Config, Objective]:
    """(the run's config, its Objective) for ``pretrain distill``: the teacher read, the student derived."""
    if not cfg.distill.teacher:
        raise ConfigError(["distill.teacher: missing: pretrain distill needs a teacher (one of our checkpoint "
                           "directories or a transformers directory)"])
    teacher = load_teacher(cfg.distill.teacher)
    out = distill_config(cfg, teacher, world_size)
    replaced = " (the config's model section is replaced by it)" if cfg.model not in (ModelConfig(), out.model) else ""
    log.info("distilling %s (%s) into a %s student of %s, from teacher layers %s%s",
             teacher.identity["path"], _layers(teacher.model.num_layers), out.model.arch,
             _layers(out.model.num_layers), layer_map(teacher.model, cfg.distill), replaced)
    return out, objective(out, teacher)


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")
