"""Conversion between our consolidated weights and HuggingFace transformers models.

Which HF class a config maps to (export), and which HF classes import accepts:

    arch    layer_norm_position  sentence_head   HF class
    bert    post                 nsp / sop       BertForPreTraining  (SOP reuses the NSP head)
    bert    post                 none            BertForMaskedLM     (RoBERTa-style: no pooler)
    bert    pre                  nsp / sop       MegatronBertForPreTraining  (Megatron-BERT is pre-LN)
    bert    pre                  none            MegatronBertForMaskedLM
    albert  post                 sop             AlbertForPreTraining
    albert  post                 none            AlbertForMaskedLM
    albert  pre                  -               not exportable (HF has no pre-LN ALBERT)
    roberta post                 none            RobertaForMaskedLM  (position ids from 2, pad_token_id 1)
    distilbert post              none            DistilBertForMaskedLM  (no token types; layer_norm_eps 1e-12)

Fine-tuned models (pretrain.finetune.model.FinetuneModel) export by family and task:

    family (arch, layer_norm_position)   task       HF class (head parameters)
    Bert (bert, post)                    sequence   BertForSequenceClassification (bert.pooler, classifier)
    MegatronBert (bert, pre)             token      ...ForTokenClassification      (classifier; no pooler)
    Albert (albert, post)                qa         ...ForQuestionAnswering        (qa_outputs [2, H]; no pooler)
    Roberta (roberta, post)                         RobertaForSequenceClassification: its classifier.dense is
                                                    our pooler, classifier.out_proj our classifier
    DistilBert (distilbert, post)                   DistilBertForSequenceClassification: its pre_classifier
                                                    (+ ReLU, not tanh) is our pooler

with num_labels, id2label/label2id, problem_type (sequence: single_label_classification or
regression) and the head dropout (classifier_dropout; ALBERT: classifier_dropout_prob; DistilBERT:
seq_classif_dropout, qa_dropout, and classifier_dropout for its token class, which drops out by the
encoder's dropout) in config.json.
Fine-tuning starts from any of the classes above or a bare BertModel, MegatronBertModel, AlbertModel,
RobertaModel or DistilBertModel directory (:func:`read_hf_weights`).

Our fused qkv [3H, H] is split into query/key/value; the decoder weight (tied to the word
embeddings) and decoder bias are written to both HF names (DistilBERT has one of each); ALBERT without
embedding_size gets an identity embedding_hidden_mapping_in.  The vocabulary padding never leaves the
model.  Weights received from elsewhere are checked before transformers reads them (safetensors, or a .bin read
weights-only: a pickled payload is refused, never run).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

from data_prep.vocab import BPE_SPECIAL_TOKENS, declared_lowercase, normalizer_flags, special_tokens_map
from pretrain.config import (DISTILBERT_LAYER_NORM_EPS, Config, ModelConfig, TrainingConfig, config_from_dict,
                             max_seq_len)
from pretrain.weights import read_json_object

SUPPORTED_HF_ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "MegatronBertForPreTraining",
                              "MegatronBertForMaskedLM", "AlbertForPreTraining", "AlbertForMaskedLM",
                              "RobertaForMaskedLM", "DistilBertForMaskedLM")
FAMILIES = ("Bert", "MegatronBert", "Albert", "Roberta", "DistilBert")
TASK_HEADS = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification",
              "qa": "ForQuestionAnswering"}
"""Fine-tuning task -> suffix of its HF class."""
HEAD_MODULES = {"sequence": "classifier", "token": "classifier", "qa": "qa_outputs"}
"""Fine-tuning task -> its output layer's name in FinetuneModel (and in the HF class but RoBERTa's sequence one)."""
FINETUNED_HF_ARCHITECTURES = tuple(f + h for h in TASK_HEADS.values() for f in FAMILIES)
ENCODER_HF_ARCHITECTURES = tuple(f + "Model" for f in FAMILIES)
FINETUNE_SOURCE_ARCHITECTURES = SUPPORTED_HF_ARCHITECTURES + FINETUNED_HF_ARCHITECTURES + ENCODER_HF_ARCHITECTURES
"""What fine-tuning may start from: a pretraining, fine-tuned or bare-encoder directory."""
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ROBERTA_PAD_ID = 1
"""RoBERTa's padding index: transformers' position ids count from it + 1, and padding slots sit at it."""


# --------------------------------------------------------------------------------------------
# Architecture and config
# --------------------------------------------------------------------------------------------
def hf_family(m: ModelConfig) -> str:
    """Bert, MegatronBert (pre-LN BERT), Albert, Roberta or DistilBert: the prefix of the transformers classes
    for ``m``."""
    if m.arch == "roberta":
        return "Roberta"
    if m.arch == "distilbert":      # its layer_norm_eps is transformers' (a config rule)
        return "DistilBert"
    if m.arch == "albert":
        if m.layer_norm_position == "pre":
            raise ValueError("model.layer_norm_position=pre with model.arch=albert has no HuggingFace "
                             "equivalent (AlbertModel is post-LN); it cannot be exported")
        return "Albert"
    return "MegatronBert" if m.layer_norm_position == "pre" else "Bert"


def hf_architecture(m: ModelConfig) -> str:
    """Name of the transformers class that holds a model of config ``m`` (see the module table)."""
    return hf_family(m) + ("ForMaskedLM" if m.sentence_head == "none" else "ForPreTraining")


def finetuned_architecture(m: ModelConfig, task: str) -> str:
    """Name of the transformers class for a fine-tuned model of config ``m`` and ``task``."""
    if task not in TASK_HEADS:
        raise ValueError(f"task: got {task!r}, expected one of {', '.join(TASK_HEADS)}")
    return hf_family(m) + TASK_HEADS[task]


def task_of_architecture(architecture: str) -> str | None:
    """The fine-tuning task of an HF class name (BertForTokenClassification -> token), else None."""
    return next((task for task, suffix in TASK_HEADS.items() if architecture.endswith(suffix)), None)


def hf_config(m: ModelConfig, architecture: str | None = None, **settings):
    """The transformers config object for ``m`` (architectures set, no network access).
    ``architecture`` replaces hf_architecture(m); ``settings`` are further config fields."""
    import transformers
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                  hidden_act="gelu" if m.hidden_act == "gelu" else "gelu_new",
                  hidden_dropout_prob=m.hidden_dropout, attention_probs_dropout_prob=m.attention_dropout,
                  max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
                  initializer_range=m.initializer_range, layer_norm_eps=m.layer_norm_eps,
                  architectures=[architecture or hf_architecture(m)])
    if m.arch == "albert":
        groups = 1 if m.share_layers else m.num_layers
        # Our sentence head has no dropout; HF's SOP head drops out by classifier_dropout_prob (0.1 by default).
        albert = dict(embedding_size=m.embedding_size or m.hidden_size, num_hidden_groups=groups, inner_group_num=1,
                      classifier_dropout_prob=0.0)
        return transformers.AlbertConfig(**{**common, **albert, **settings})
    if m.arch == "roberta":
        return transformers.RobertaConfig(**{**common, "pad_token_id": ROBERTA_PAD_ID, "bos_token_id": 0,
                                             "eos_token_id": 2, **settings})
    if m.arch == "distilbert":   # its own names; no token types; its LayerNorm eps is built in (hf_family)
        distilbert = dict(vocab_size=m.vocab_size, dim=m.hidden_size, n_layers=m.num_layers, n_heads=m.num_heads,
                          hidden_dim=m.intermediate_size, activation=common["hidden_act"], dropout=m.hidden_dropout,
                          attention_dropout=m.attention_dropout, max_position_embeddings=m.max_position_embeddings,
                          sinusoidal_pos_embds=False, initializer_range=m.initializer_range, pad_token_id=0,
                          tie_word_embeddings=True, architectures=common["architectures"])
        return transformers.DistilBertConfig(**{**distilbert, **settings})
    if m.layer_norm_position == "pre":
        return transformers.MegatronBertConfig(**common, **settings)
    return transformers.BertConfig(**common, **settings)


def finetuned_hf_config(m: ModelConfig, head):
    """The transformers config of a fine-tuned model: ``head`` (a resolved
    pretrain.finetune.model.HeadConfig) gives num_labels, id2label/label2id, problem_type and the
    head dropout.  MegatronBert's sequence and token classes, and DistilBertForTokenClassification, drop
    out by the encoder's hidden dropout whatever the config says; classifier_dropout is still written, so
    that our import reads the head's value back."""
    architecture = finetuned_architecture(m, head.task)
    dropout_key = _head_dropout_key(architecture)
    by_hidden = (architecture.startswith("MegatronBert") and head.task != "qa"
                 or architecture == "DistilBertForTokenClassification")
    if by_hidden and head.dropout != m.hidden_dropout:
        hidden_key = "dropout" if m.arch == "distilbert" else "hidden_dropout_prob"
        warnings.warn(f"{architecture} drops out by {hidden_key}={m.hidden_dropout}, not by the head "
                      f"dropout {head.dropout}: training the exported model further in transformers differs "
                      "(its outputs in eval mode do not)", stacklevel=3)
    settings = {"num_labels": head.num_labels, "id2label": dict(enumerate(head.labels)),
                "label2id": {name: i for i, name in enumerate(head.labels)}, dropout_key: head.dropout}
    if head.task == "sequence":
        settings["problem_type"] = head.problem_type
    return hf_config(m, architecture, **settings)


DISTILBERT_HEAD_DROPOUT = {"DistilBertForSequenceClassification": "seq_classif_dropout",
                           "DistilBertForQuestionAnswering": "qa_dropout"}


def _head_dropout_key(architecture: str) -> str:
    """The config.json key of a fine-tuned HF class's head dropout (written by export, read by import)."""
    if architecture.startswith("Albert"):
        return "classifier_dropout_prob"
    return DISTILBERT_HEAD_DROPOUT.get(architecture, "classifier_dropout")


def head_settings_from_hf(hf_cfg, architecture: str) -> dict | None:
    """The head of a fine-tuned HF config as HeadConfig fields (task, num_labels, labels, problem_type,
    dropout), or None for a pretraining or bare-encoder architecture.  Dropout: the value the HF class
    itself would use (classifier_dropout, else hidden_dropout_prob; ALBERT: classifier_dropout_prob;
    DistilBERT: seq_classif_dropout, qa_dropout, classifier_dropout else dropout)."""
    task = task_of_architecture(architecture)
    if task is None:
        return None
    id2label = {int(k): v for k, v in (hf_cfg.id2label or {}).items()}
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(hf_cfg.num_labels)]
    dropout = getattr(hf_cfg, _head_dropout_key(architecture), None)
    if dropout is None:
        dropout = hf_cfg.dropout if architecture.startswith("DistilBert") else hf_cfg.hidden_dropout_prob
    has_dropout = task != "qa" or architecture.startswith("DistilBert")   # the other QA classes have none
    return {"task": task, "num_labels": hf_cfg.num_labels, "labels": labels,
            "problem_type": getattr(hf_cfg, "problem_type", None) if task == "sequence" else None,
            "dropout": dropout if has_dropout else None}


def model_config_from_hf(hf_cfg, source: str, supported: tuple = SUPPORTED_HF_ARCHITECTURES) -> ModelConfig:
    """Our ModelConfig for a transformers Bert/MegatronBert/Albert/Roberta/DistilBert config (``source``
    names it in errors) whose architectures name one of ``supported``; sentence_head is none unless it is a
    ...ForPreTraining."""
    arch = _architecture_of(hf_cfg, source, supported)
    family = next((f for f in ("albert", "roberta", "distilbert") if arch.lower().startswith(f)), "bert")
    fields = _distilbert_fields(hf_cfg, source) if family == "distilbert" else _bert_fields(hf_cfg)
    act_key, hf_act = ("activation", hf_cfg.activation) if family == "distilbert" else ("hidden_act", hf_cfg.hidden_act)
    act = HF_ACTIVATIONS.get(hf_act)
    if act is None:
        raise ValueError(f"{source}: {act_key} {hf_act!r} is not supported "
                         f"(expected one of {', '.join(HF_ACTIVATIONS)})")
    if getattr(hf_cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type {hf_cfg.position_embedding_type!r} is not supported "
                         "(expected 'absolute')")
    if family == "roberta" and hf_cfg.pad_token_id != ROBERTA_PAD_ID:
        raise ValueError(f"{source}: RoBERTa with pad_token_id {hf_cfg.pad_token_id} is not supported (expected "
                         f"{ROBERTA_PAD_ID}: its position ids count from the padding index)")
    m = ModelConfig(arch=family, vocab_size=hf_cfg.vocab_size,
                    hidden_size=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers,
                    num_heads=hf_cfg.num_attention_heads, max_position_embeddings=hf_cfg.max_position_embeddings,
                    hidden_act=act, initializer_range=hf_cfg.initializer_range,
                    layer_norm_position="pre" if arch.startswith("MegatronBert") else "post", **fields)
    if not arch.endswith("ForPreTraining"):
        m.sentence_head = "none"
    if m.arch == "albert":
        _albert_options(m, hf_cfg, source)
    return m


def _bert_fields(hf_cfg) -> dict:
    return dict(intermediate_size=hf_cfg.intermediate_size, type_vocab_size=hf_cfg.type_vocab_size,
                layer_norm_eps=hf_cfg.layer_norm_eps, hidden_dropout=hf_cfg.hidden_dropout_prob,
                attention_dropout=hf_cfg.attention_probs_dropout_prob)


def _distilbert_fields(hf_cfg, source: str) -> dict:
    """DistilBertConfig's names for _bert_fields; it has no token types (type_vocab_size keeps our default,
    which arch distilbert ignores) and no LayerNorm eps setting."""
    if hf_cfg.sinusoidal_pos_embds:
        raise ValueError(f"{source}: sinusoidal_pos_embds true is not supported (expected false: learned "
                         "position embeddings)")
    return dict(intermediate_size=hf_cfg.hidden_dim, layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
                hidden_dropout=hf_cfg.dropout, attention_dropout=hf_cfg.attention_dropout)


def _albert_options(m: ModelConfig, hf_cfg, source: str) -> None:
    groups, inner = hf_cfg.num_hidden_groups, hf_cfg.inner_group_num
    if inner != 1 or groups not in (1, hf_cfg.num_hidden_layers):
        raise ValueError(f"{source}: ALBERT with num_hidden_groups={groups}, inner_group_num={inner} is not "
                         f"supported (expected inner_group_num=1 and num_hidden_groups 1 (shared) or "
                         f"num_hidden_layers={hf_cfg.num_hidden_layers} (unshared))")
    m.embedding_size = hf_cfg.embedding_size
    m.share_layers = groups == 1 and hf_cfg.num_hidden_layers > 1
    if m.sentence_head == "nsp":
        m.sentence_head = "sop"


def _architecture_of(hf_cfg, source: str, supported: tuple = SUPPORTED_HF_ARCHITECTURES) -> str:
    found = list(getattr(hf_cfg, "architectures", None) or [])
    known = [a for a in found if a in supported]
    if not known:
        raise ValueError(f"{source}: architectures {found or 'missing'} (model_type "
                         f"{getattr(hf_cfg, 'model_type', None)!r}) is not supported; expected one of "
                         f"{', '.join(supported)}")
    return known[0]


# --------------------------------------------------------------------------------------------
# Parameter names: ours -> HF.  A tuple of HF names means "rows concatenated" (our fused qkv).
# --------------------------------------------------------------------------------------------
BERT_LAYER = {"attention.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
              "attention.out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn_norm": "output.LayerNorm"}
MEGATRON_LAYER = dict(BERT_LAYER, attention_norm="attention.ln", ffn_norm="ln")
EMBEDDING_TABLES = ("embeddings.word", "embeddings.position", "embeddings.token_type")  # weight only
DISTILBERT_LAYER = {"attention.qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                    "attention.out": "attention.out_lin", "attention_norm": "sa_layer_norm",
                    "ffn.up": "ffn.lin1", "ffn.down": "ffn.lin2", "ffn_norm": "output_layer_norm"}
ALBERT_LAYER = {"attention.qkv": ("attention.query", "attention.key", "attention.value"),
                "attention.out": "attention.dense", "attention_norm": "attention.LayerNorm",
                "ffn.up": "ffn", "ffn.down": "ffn_output", "ffn_norm": "full_layer_layer_norm"}


def _bert_modules(m: ModelConfig) -> dict:
    names = {"embeddings.word": "bert.embeddings.word_embeddings",
             "embeddings.position": "bert.embeddings.position_embeddings",
             "embeddings.token_type": "bert.embeddings.token_type_embeddings",
             "mlm_head.dense": "cls.predictions.transform.dense",
             "mlm_head.norm": "cls.predictions.transform.LayerNorm",
             "pooler": "bert.pooler.dense", "sentence_head": "cls.seq_relationship"}
    if m.layer_norm_position == "post":
        names["embeddings.norm"] = "bert.embeddings.LayerNorm"
    else:
        names["encoder.final_norm"] = "bert.encoder.ln"
    layer = MEGATRON_LAYER if m.layer_norm_position == "pre" else BERT_LAYER
    for i in range(m.num_layers):
        names.update({f"encoder.layers.{i}.{ours}": _prefixed(f"bert.encoder.layer.{i}.", hf)
                      for ours, hf in layer.items()})
    return names


def _roberta_modules(m: ModelConfig) -> dict:
    names = {"embeddings.word": "roberta.embeddings.word_embeddings",
             "embeddings.position": "roberta.embeddings.position_embeddings",
             "embeddings.token_type": "roberta.embeddings.token_type_embeddings",
             "embeddings.norm": "roberta.embeddings.LayerNorm",
             "mlm_head.dense": "lm_head.dense", "mlm_head.norm": "lm_head.layer_norm"}
    # No pooler: RoBERTa's task classes have none (a RobertaModel's goes unused, as in transformers), and
    # its sequence head's dense is our pooler (head_names).
    for i in range(m.num_layers):
        names.update({f"encoder.layers.{i}.{ours}": _prefixed(f"roberta.encoder.layer.{i}.", hf)
                      for ours, hf in BERT_LAYER.items()})
    return names


def _distilbert_modules(m: ModelConfig) -> dict:
    names = {"embeddings.word": "distilbert.embeddings.word_embeddings",
             "embeddings.position": "distilbert.embeddings.position_embeddings",
             "embeddings.norm": "distilbert.embeddings.LayerNorm",
             "mlm_head.dense": "vocab_transform", "mlm_head.norm": "vocab_layer_norm"}
    # No pooler: DistilBERT has none; its sequence head's pre_classifier is our pooler (head_names).
    for i in range(m.num_layers):
        names.update({f"encoder.layers.{i}.{ours}": _prefixed(f"distilbert.transformer.layer.{i}.", hf)
                      for ours, hf in DISTILBERT_LAYER.items()})
    return names


def _albert_modules(m: ModelConfig) -> dict:
    names = {"embeddings.word": "albert.embeddings.word_embeddings",
             "embeddings.position": "albert.embeddings.position_embeddings",
             "embeddings.token_type": "albert.embeddings.token_type_embeddings",
             "embeddings.norm": "albert.embeddings.LayerNorm",
             "embeddings.projection": "albert.encoder.embedding_hidden_mapping_in",
             "mlm_head.dense": "predictions.dense", "mlm_head.norm": "predictions.LayerNorm",
             "pooler": "albert.pooler", "sentence_head": "sop_classifier.classifier"}
    for i in range(1 if m.share_layers else m.num_layers):
        group = f"albert.encoder.albert_layer_groups.{i}.albert_layers.0."
        names.update({f"encoder.layers.{i}.{ours}": _prefixed(group, hf) for ours, hf in ALBERT_LAYER.items()})
    return names


def _prefixed(prefix: str, hf, suffix: str = ""):
    return tuple(prefix + h + suffix for h in hf) if isinstance(hf, tuple) else prefix + hf + suffix


def key_map(m: ModelConfig) -> dict:
    """{our parameter name: HF name or tuple of HF names} for every parameter of a model of config m."""
    modules = {"albert": _albert_modules, "roberta": _roberta_modules,
               "distilbert": _distilbert_modules}.get(m.arch, _bert_modules)(m)
    names = {}
    for ours, hf in modules.items():
        for param in ("weight",) if ours in EMBEDDING_TABLES else ("weight", "bias"):
            names[f"{ours}.{param}"] = _prefixed("", hf, suffix=f".{param}")
    names["mlm_head.decoder_bias"] = f"{MLM_HEADS[m.arch][0]}.bias"
    return names


MLM_HEADS = {"bert": ("cls.predictions", "bert"), "albert": ("predictions", "albert"),
             "roberta": ("lm_head", "roberta"), "distilbert": ("vocab_projector", "distilbert")}
"""arch -> (the HF MLM head's prefix, the encoder's prefix)."""


def tied_copies(m: ModelConfig) -> dict:
    """{HF name: HF name it is a copy of}: the decoder tied to the word embeddings and its bias
    (DistilBERT's vocab_projector is the decoder itself, with its one bias)."""
    head, base = MLM_HEADS[m.arch]
    if m.arch == "distilbert":
        return {f"{head}.weight": f"{base}.embeddings.word_embeddings.weight"}
    return {f"{head}.decoder.weight": f"{base}.embeddings.word_embeddings.weight",
            f"{head}.decoder.bias": f"{head}.bias"}


def _expected_ours(m: ModelConfig) -> set:
    """Our parameter names for config m, from the model itself (so the map cannot drift from it)."""
    import torch
    from pretrain.model import build_model
    with torch.device("meta"):
        return set(build_model(m).state_dict())


# --------------------------------------------------------------------------------------------
# State-dict conversion
# --------------------------------------------------------------------------------------------
def finetuned_key_map(m: ModelConfig, head) -> dict:
    """key_map for a FinetuneModel of config m and ``head`` (a resolved HeadConfig): the encoder's and
    the pooler's names as in key_map, the output layer under the same name in both (HEAD_MODULES)."""
    from pretrain.finetune.model import FinetuneModel
    import torch
    with torch.device("meta"):
        expected = set(FinetuneModel(m, head).state_dict())
    names = {k: v for k, v in key_map(m).items() if k in expected}
    names.update(head_names(m, head.task))
    return names


def head_names(m: ModelConfig, task: str) -> dict:
    """{our name: HF name} of a fine-tuned head's layers the encoder's key_map does not name: the output
    layer, RoBERTa's sequence head (RobertaClassificationHead: dense + tanh = our pooler, out_proj) and
    DistilBERT's pre_classifier (+ ReLU: our pooler of a distilbert sequence head)."""
    if m.arch == "roberta" and task == "sequence":
        return {f"{ours}.{p}": f"classifier.{hf}.{p}" for ours, hf in (("pooler", "dense"), ("classifier", "out_proj"))
                for p in ("weight", "bias")}
    if m.arch == "distilbert" and task == "sequence":
        return {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in (("pooler", "pre_classifier"), ("classifier", "classifier"))
                for p in ("weight", "bias")}
    layer = HEAD_MODULES[task]
    return {f"{layer}.{p}": f"{layer}.{p}" for p in ("weight", "bias")}


def to_hf_state_dict(state_dict: dict, m: ModelConfig) -> dict:
    """Our consolidated state dict (vocabulary trimmed) -> the HF state dict of hf_architecture(m)."""
    names = {k: v for k, v in key_map(m).items() if k in _expected_ours(m)}
    hf = _to_hf(state_dict, names, m, f"a model.{m.arch} model")
    for copy, source in tied_copies(m).items():
        hf[copy] = hf[source]
    return hf


def finetuned_to_hf_state_dict(state_dict: dict, m: ModelConfig, head) -> dict:
    """A FinetuneModel's consolidated state dict -> the HF state dict of finetuned_architecture(m, head.task)."""
    return _to_hf(state_dict, finetuned_key_map(m, head), m, f"a model.{m.arch} {head.task} model")


def _to_hf(state_dict: dict, names: dict, m: ModelConfig, what: str) -> dict:
    import torch
    from pretrain.model import trim_vocab
    state_dict = trim_vocab(state_dict, m)
    missing = sorted(set(names) - set(state_dict))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} parameter(s) {what} needs: {', '.join(missing[:5])}")
    hf = {}
    for ours, theirs in names.items():
        if isinstance(theirs, tuple):
            hf.update(zip(theirs, state_dict[ours].chunk(len(theirs), dim=0)))
        else:
            hf[theirs] = state_dict[ours]
    if m.arch == "albert" and m.embedding_size is None:  # E == H without projection: identity mapping
        hf["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(m.hidden_size)
        hf["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(m.hidden_size)
    return {k: v.contiguous() for k, v in hf.items()}


def from_hf_state_dict(hf: dict, m: ModelConfig, source: str = "HF state dict") -> dict:
    """An HF state dict (of the class model_config_from_hf derived m from) -> our consolidated state dict."""
    import torch
    for copy, original in tied_copies(m).items():
        if copy in hf and original in hf and not torch.equal(hf[copy], hf[original]):
            raise ValueError(f"{source}: {copy} differs from {original}; an untied MLM decoder is not supported")
    names = {k: v for k, v in key_map(m).items() if k in _expected_ours(m)}
    return _from_hf(hf, names, source)


def _hf_names(theirs) -> tuple:
    return theirs if isinstance(theirs, tuple) else (theirs,)


def _from_hf(hf: dict, names: dict, source: str, optional: set = frozenset()) -> dict:
    """{ours: tensor} for every entry of ``names`` whose HF weights are all in ``hf``; those of ours
    not in ``optional`` must be there."""
    import torch
    missing = [h for ours, theirs in names.items() if ours not in optional for h in _hf_names(theirs) if h not in hf]
    if missing:
        raise ValueError(f"{source}: lacks {len(missing)} expected weight(s): {', '.join(missing[:5])}")
    return {ours: (torch.cat([hf[h] for h in theirs]) if isinstance(theirs, tuple) else hf[theirs]).float().clone()
            for ours, theirs in names.items() if all(h in hf for h in _hf_names(theirs))}


def finetune_weights_from_hf(hf: dict, m: ModelConfig, source_task: str | None, source: str) -> tuple[dict, list]:
    """(our consolidated weights, unused HF names) from the HF state dict of a directory fine-tuning starts
    from: the encoder (required), the pooler when there is one, and the output layer of a fine-tuned
    ``source_task`` model.  The MLM and sentence heads are among the unused names."""
    encoder = {k: v for k, v in key_map(m).items() if k.split(".")[0] in ("embeddings", "encoder", "pooler")}
    names = {k: v for k, v in encoder.items() if k in _expected_ours(dataclasses.replace(m, sentence_head="nsp"))}
    if source_task is not None:
        names.update(head_names(m, source_task))
    optional = {k for k in names if not k.startswith(("embeddings.", "encoder."))}
    ours = _from_hf(hf, names, source, optional)
    used = {h for k in ours for h in _hf_names(names[k])}
    return ours, sorted(set(hf) - used)


# --------------------------------------------------------------------------------------------
# Export / import of whole directories
# --------------------------------------------------------------------------------------------
def export_checkpoint(checkpoint: str, out_dir: str, tokenizer_dir: str | None = None) -> dict:
    """Write a transformers directory (config.json + weights + tokenizer files) from a checkpoint.

    The tokenizer comes from ``tokenizer_dir``, else the copy in the checkpoint directory, else the
    checkpoint's extra ``tokenizer_dir``, else its config ``data.tokenizer``; one whose hash is not
    the tokenizer hash recorded in the checkpoint is refused.  With none, only the weights are
    written and a warning is issued.  Returns a summary: architecture, out_dir, tokenizer (the
    directory used, or None).
    """
    import transformers
    from pretrain.weights import load_weights, resolve_checkpoint_dir
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    config, state_dict, extra = load_weights(ckpt_dir)
    m = config.model
    architecture = hf_architecture(m)
    tokenizer_dir = checkpoint_tokenizer_dir(ckpt_dir, config, extra, tokenizer_dir)
    spec = _tokenizer_spec(tokenizer_dir, m) if tokenizer_dir else None  # bad tokenizer: fail before writing
    model = getattr(transformers, architecture)(hf_config(m))
    model.load_state_dict(to_hf_state_dict(state_dict, m), strict=True)
    _save_hf(model, out_dir, tokenizer_dir, spec, checkpoint)
    return {"architecture": architecture, "out_dir": out_dir, "tokenizer": tokenizer_dir or None}


def export_finetuned(model, out_dir: str, tokenizer_dir: str | None = None) -> dict:
    """Write a transformers directory of a fine-tuned ``model`` (a FinetuneModel): config.json with its
    labels, model.safetensors and, from ``tokenizer_dir``, the tokenizer files (see export_tokenizer), so
    that the Auto classes and ``transformers.pipeline("text-classification" / "token-classification" /
    "question-answering", model=out_dir)`` load it (transformers 5 has no question-answering pipeline).
    Returns a summary as export_checkpoint does."""
    import transformers
    m, head = model.config, model.head
    architecture = finetuned_architecture(m, head.task)
    spec = _tokenizer_spec(tokenizer_dir, m) if tokenizer_dir else None
    hf_model = getattr(transformers, architecture)(finetuned_hf_config(m, head))
    hf_model.load_state_dict(finetuned_to_hf_state_dict(model.state_dict(), m, head), strict=True)
    _save_hf(hf_model, out_dir, tokenizer_dir, spec, "the fine-tuned model")
    return {"architecture": architecture, "out_dir": out_dir, "tokenizer": tokenizer_dir or None}


def _save_hf(hf_model, out_dir: str, tokenizer_dir: str | None, spec: dict | None, what: str) -> None:
    from pretrain.weights import file_mode
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    for name in os.listdir(out_dir):      # transformers writes the weights 0600: the umask's mode, as other files
        if name.endswith((".safetensors", ".safetensors.index.json")):
            os.chmod(os.path.join(out_dir, name), file_mode())
    if spec:
        export_tokenizer(tokenizer_dir, out_dir, spec)
    else:
        warnings.warn(f"no tokenizer known for {what} (pass --tokenizer DIR): {out_dir} has the weights "
                      "but no tokenizer files, so AutoTokenizer.from_pretrained will not load it", stacklevel=3)


def checkpoint_tokenizer_dir(ckpt_dir: str, config: Config, extra: dict, tokenizer_dir: str | None = None):
    """The tokenizer of a checkpoint: ``tokenizer_dir``, else the copy in the checkpoint directory, else its
    extra ``tokenizer_dir``, else its config ``data.tokenizer``, else None.  One whose hash is not the
    tokenizer hash recorded in the checkpoint is refused (ValueError)."""
    from pretrain.weights import TOKENIZER_DIR
    own = os.path.join(ckpt_dir, TOKENIZER_DIR)
    tokenizer_dir = tokenizer_dir or (own if os.path.isdir(own) else None) or extra.get("tokenizer_dir") \
        or config.data.tokenizer or None
    recorded = (extra.get("fingerprints") or {}).get("tokenizer")
    if tokenizer_dir and recorded:
        _check_tokenizer_hash(tokenizer_dir, recorded, ckpt_dir)
    return tokenizer_dir


def _check_tokenizer_hash(tokenizer_dir: str, recorded: str, ckpt_dir: str) -> None:
    from pathlib import Path

    from data_prep.errors import PrepError
    from data_prep.vocab import load_tokenizer_dir
    try:
        found = load_tokenizer_dir(Path(tokenizer_dir))[1].sha256
    except PrepError as err:
        raise ValueError(f"tokenizer {tokenizer_dir}: {err}") from None
    if found != recorded:
        raise ValueError(f"tokenizer {tokenizer_dir} hashes to {found} but {ckpt_dir} was trained with tokenizer "
                         f"{recorded}: pass --tokenizer DIR with the tokenizer the run was trained with")


def export_tokenizer(tokenizer_dir: str, out_dir: str, spec: dict) -> None:
    """Copy tokenizer.json / vocab.txt and write a tokenizer_config.json AutoTokenizer understands.
    A RoBERTa byte-level BPE tokenizer gets RoBERTa's files instead of a vocab.txt: vocab.json and
    merges.txt (from tokenizer.json, what the slow RobertaTokenizer reads) and its special tokens."""
    for name in spec["files"]:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    if spec["merges"] is not None:
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(spec["vocab"], f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.writelines(["#version: 0.2\n", *(" ".join(pair) + "\n" for pair in spec["merges"])])
        settings = dict(special_tokens_map("BPE"), tokenizer_class=spec["class"], add_prefix_space=False,
                        trim_offsets=True, model_max_length=spec["model_max_length"])
    else:
        if spec["vocab"] and "vocab.txt" not in spec["files"]:
            with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
                f.writelines(token + "\n" for token in sorted(spec["vocab"], key=spec["vocab"].get))
        settings = dict(special_tokens_map("WordPiece"), tokenizer_class=spec["class"],
                        do_lower_case=spec["lowercase"], model_max_length=spec["model_max_length"])
    if spec["strip_accents"] is not None:
        settings["strip_accents"] = spec["strip_accents"]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def _tokenizer_spec(tokenizer_dir: str, m: ModelConfig) -> dict:
    """Files, class, lowercasing, accent stripping and WordPiece vocab of a tokenizer directory."""
    files = [f for f in ("tokenizer.json", "vocab.txt") if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if not files:
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir}: expected tokenizer.json or vocab.txt in it "
                                "(pass --tokenizer DIR to export with another one)")
    # DistilBERT's tokenizer is BERT's WordPiece, less the token_type_ids its models take none of.
    wordpiece = "DistilBertTokenizerFast" if m.arch == "distilbert" else "BertTokenizerFast"
    spec = {"files": files, "class": wordpiece, "lowercase": None, "strip_accents": None,
            "vocab": None, "merges": None, "model_max_length": max_seq_len(m)}
    model = {}
    if "tokenizer.json" in files:
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
        if model.get("type") == "WordPiece":
            spec["vocab"] = model.get("vocab")
        elif model.get("type") == "BPE" and set(BPE_SPECIAL_TOKENS) <= {*model.get("vocab", {}), *_added_tokens(data)}:
            # RoBERTa's byte-level BPE (data_prep vocab --model bpe): its files, not data_prep's vocab.txt listing
            spec.update(files=["tokenizer.json"], vocab={**model["vocab"], **_added_tokens(data)}, lowercase=False,
                        merges=[m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])])
            spec["class"] = "RobertaTokenizerFast"
        else:
            spec["class"] = "PreTrainedTokenizerFast"
        spec["lowercase"], spec["strip_accents"] = normalizer_flags(data.get("normalizer"))
    if spec["vocab"] is None and "vocab.txt" in files:
        with open(os.path.join(tokenizer_dir, "vocab.txt"), encoding="utf-8") as f:
            spec["vocab"] = {line.rstrip("\n"): i for i, line in enumerate(f)}
    if spec["vocab"] and len(spec["vocab"]) > m.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(spec['vocab'])} tokens but model.vocab_size is "
                         f"{m.vocab_size}")
    pad = (spec["vocab"] or model.get("vocab") or {}).get("<pad>")
    if m.arch == "roberta" and pad != ROBERTA_PAD_ID:
        raise ValueError(f"tokenizer {tokenizer_dir}: model.arch=roberta needs RoBERTa's vocabulary, '<pad>' at id "
                         f"{ROBERTA_PAD_ID} (transformers' RoBERTa counts positions from the padding id), not "
                         f"{'no <pad>' if pad is None else f'<pad> at {pad}'}")
    if spec["lowercase"] is None:  # a bare vocab.txt: as data_prep reads it, uncased unless declared
        spec["lowercase"] = declared_lowercase(tokenizer_dir)
    return spec


def _added_tokens(tokenizer_json: dict) -> dict[str, int]:
    """{content: id} of a tokenizer.json's added tokens (RoBERTa's <mask> is one, outside the BPE vocab)."""
    return {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens") or []}


def import_hf(hf_dir: str, out_dir: str) -> Config:
    """Write our consolidated-weights checkpoint (model.pt + config.yaml) from a transformers directory.

    The tokenizer files found there are copied to OUT/tokenizer and recorded in extra.json.
    """
    from pretrain.model import build_model
    from pretrain.weights import TOKENIZER_DIR, copy_tokenizer, save_weights
    hf_cfg = _read_hf_config(hf_dir)
    m = model_config_from_hf(hf_cfg, os.path.join(hf_dir, "config.json"))
    config = model_only_config(m, os.path.join(hf_dir, "config.json"))
    hf_model, _ = _load_hf_model(hf_dir, _architecture_of(hf_cfg, hf_dir))
    state_dict = from_hf_state_dict(hf_model.state_dict(), m, source=hf_dir)
    build_model(m).load_consolidated_state_dict(state_dict)  # fails loudly if the mapping missed anything
    extra = {"source": {"format": "huggingface", "dir": os.path.abspath(hf_dir)}}
    tokenizer_dir = copy_tokenizer(hf_dir, os.path.join(out_dir, TOKENIZER_DIR))
    if tokenizer_dir:
        extra["tokenizer_dir"] = tokenizer_dir
    save_weights(out_dir, config, state_dict, extra)
    return config


@dataclasses.dataclass
class HFSource:
    """What fine-tuning reads from a transformers directory (:func:`read_hf_weights`)."""
    model: ModelConfig
    architecture: str
    head: dict | None
    """head_settings_from_hf: the head of a fine-tuned directory, None for a pretraining or bare encoder."""
    state_dict: dict
    """Our names: the encoder, the pooler where the files hold one, a fine-tuned directory's output layer."""
    unused: list
    """HF names in the files that state_dict does not use (MLM and sentence heads)."""
    tokenizer_dir: str | None
    """The directory itself when it holds tokenizer.json or vocab.txt."""


def read_hf_weights(hf_dir: str) -> HFSource:
    """The encoder (and pooler, and fine-tuned head) of a transformers directory of any of
    FINETUNE_SOURCE_ARCHITECTURES, for fine-tuning or evaluating.  The weight files are checked as for
    import_hf (a pickled payload is refused, never run); weights the files lack are left out (transformers
    would have initialized them at random), so the caller initializes them."""
    source = os.path.join(hf_dir, "config.json")
    hf_cfg = _read_hf_config(hf_dir, FINETUNE_SOURCE_ARCHITECTURES)
    architecture = _architecture_of(hf_cfg, source, FINETUNE_SOURCE_ARCHITECTURES)
    m = model_config_from_hf(hf_cfg, source, FINETUNE_SOURCE_ARCHITECTURES)
    hf_model, missing = _load_hf_model(hf_dir, architecture)
    prefix = hf_model.base_model_prefix + "." if architecture in ENCODER_HF_ARCHITECTURES else ""
    hf = {prefix + k: v for k, v in hf_model.state_dict().items() if k not in missing}
    head = head_settings_from_hf(hf_cfg, architecture)
    state_dict, unused = finetune_weights_from_hf(hf, m, head and head["task"], hf_dir)
    has_tokenizer = any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "vocab.txt"))
    return HFSource(m, architecture, head, state_dict, unused, hf_dir if has_tokenizer else None)


def is_hf_dir(path: str) -> bool:
    """A transformers model directory (config.json in it) rather than one of our checkpoints."""
    return os.path.isfile(os.path.join(path, "config.json"))


def _load_hf_model(hf_dir: str, architecture: str):
    """(transformers model of ``architecture`` from hf_dir, names of its weights the files lacked),
    after every weight file passed _check_weights_file."""
    import transformers
    for path in _hf_weight_files(hf_dir):
        _check_weights_file(path)
    try:
        hf_model, info = getattr(transformers, architecture).from_pretrained(hf_dir, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{hf_dir}: transformers could not load the model ({str(err).strip().splitlines()[0]})") \
            from None
    return hf_model, set(info["missing_keys"])


def _read_hf_config(hf_dir: str, supported: tuple = SUPPORTED_HF_ARCHITECTURES):
    import transformers
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF model directory not found: {hf_dir}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: expected a transformers model directory with config.json")
    data = read_json_object(path)
    model_type = data.get("model_type")
    if model_type not in ("bert", "megatron-bert", "albert", "roberta", "distilbert"):
        raise ValueError(f"{path}: model_type {model_type!r} (architectures {data.get('architectures')}) is not "
                         f"supported; expected one of {', '.join(supported)}")
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a valid {model_type} config ({str(err).strip().splitlines()[0]})") from None


HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),      # (single file, sharded index)
              ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _hf_weight_files(hf_dir: str) -> list[str]:
    """The weight files from_pretrained reads (safetensors first, as transformers prefers them)."""
    for single, index in HF_WEIGHTS:
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
        index_path = os.path.join(hf_dir, index)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: expected a 'weight_map' object (parameter name -> shard file)")
            return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{hf_dir}: no weights: expected model.safetensors or pytorch_model.bin (or a "
                            f"sharded {HF_WEIGHTS[0][1]} / {HF_WEIGHTS[1][1]}) in it")


def _check_weights_file(path: str) -> None:
    """Fail with a one-line error naming ``path`` if it is missing, damaged or (a .bin) holds more
    than tensors: a pickled payload is refused by weights-only loading, never run."""
    from pretrain.weights import load_torch_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        load_torch_file(path)


def model_only_config(m: ModelConfig, source: str) -> Config:
    """The run config of a model that has no run of ours (imported, or saved by fine-tuning): its model
    section, the defaults elsewhere, training lengths that fit it."""
    return config_from_dict(_config_dict(m), source=source)


def _config_dict(m: ModelConfig) -> dict:
    seq_len = min(TrainingConfig.seq_len, max_seq_len(m))
    return {"model": dataclasses.asdict(m),
            "training": {"seq_len": seq_len, "max_predictions": min(TrainingConfig.max_predictions, seq_len)}}

