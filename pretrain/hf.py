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

Our fused qkv [3H, H] is split into query/key/value; the decoder weight (tied to the word
embeddings) and decoder bias are written to both HF names; ALBERT without embedding_size gets
an identity embedding_hidden_mapping_in.  The vocabulary padding never leaves the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

from data_prep.vocab import declared_lowercase, normalizer_flags
from pretrain.config import Config, ModelConfig, TrainingConfig, config_from_dict
from pretrain.weights import read_json_object

SUPPORTED_HF_ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "MegatronBertForPreTraining",
                              "MegatronBertForMaskedLM", "AlbertForPreTraining", "AlbertForMaskedLM")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}


# --------------------------------------------------------------------------------------------
# Architecture and config
# --------------------------------------------------------------------------------------------
def hf_architecture(m: ModelConfig) -> str:
    """Name of the transformers class that holds a model of config ``m`` (see the module table)."""
    head = "ForMaskedLM" if m.sentence_head == "none" else "ForPreTraining"
    if m.arch == "albert":
        if m.layer_norm_position == "pre":
            raise ValueError("model.layer_norm_position=pre with model.arch=albert has no HuggingFace "
                             "equivalent (AlbertModel is post-LN); it cannot be exported")
        return "Albert" + head
    return ("MegatronBert" if m.layer_norm_position == "pre" else "Bert") + head


def hf_config(m: ModelConfig):
    """The transformers config object for ``m`` (architectures set, no network access)."""
    import transformers
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                  hidden_act="gelu" if m.hidden_act == "gelu" else "gelu_new",
                  hidden_dropout_prob=m.hidden_dropout, attention_probs_dropout_prob=m.attention_dropout,
                  max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
                  initializer_range=m.initializer_range, layer_norm_eps=m.layer_norm_eps,
                  architectures=[hf_architecture(m)])
    if m.arch == "albert":
        groups = 1 if m.share_layers else m.num_layers
        # Our sentence head has no dropout; HF's SOP head drops out by classifier_dropout_prob (0.1 by default).
        return transformers.AlbertConfig(embedding_size=m.embedding_size or m.hidden_size,
                                         num_hidden_groups=groups, inner_group_num=1, classifier_dropout_prob=0.0,
                                         **common)
    if m.layer_norm_position == "pre":
        return transformers.MegatronBertConfig(**common)
    return transformers.BertConfig(**common)


def model_config_from_hf(hf_cfg, source: str) -> ModelConfig:
    """Our ModelConfig for a transformers Bert/MegatronBert/Albert config (``source`` names it in errors)."""
    act = HF_ACTIVATIONS.get(hf_cfg.hidden_act)
    if act is None:
        raise ValueError(f"{source}: hidden_act {hf_cfg.hidden_act!r} is not supported "
                         f"(expected one of {', '.join(HF_ACTIVATIONS)})")
    if getattr(hf_cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type {hf_cfg.position_embedding_type!r} is not supported "
                         "(expected 'absolute')")
    arch = _architecture_of(hf_cfg, source)
    m = ModelConfig(arch="albert" if arch.startswith("Albert") else "bert", vocab_size=hf_cfg.vocab_size,
                    hidden_size=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers,
                    num_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
                    max_position_embeddings=hf_cfg.max_position_embeddings,
                    type_vocab_size=hf_cfg.type_vocab_size, layer_norm_eps=hf_cfg.layer_norm_eps,
                    hidden_act=act, hidden_dropout=hf_cfg.hidden_dropout_prob,
                    attention_dropout=hf_cfg.attention_probs_dropout_prob,
                    initializer_range=hf_cfg.initializer_range,
                    layer_norm_position="pre" if arch.startswith("MegatronBert") else "post")
    if arch.endswith("ForMaskedLM"):
        m.sentence_head = "none"
    if m.arch == "albert":
        _albert_options(m, hf_cfg, source)
    return m


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


def _architecture_of(hf_cfg, source: str) -> str:
    found = list(getattr(hf_cfg, "architectures", None) or [])
    supported = [a for a in found if a in SUPPORTED_HF_ARCHITECTURES]
    if not supported:
        raise ValueError(f"{source}: architectures {found or 'missing'} (model_type "
                         f"{getattr(hf_cfg, 'model_type', None)!r}) is not supported; expected one of "
                         f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}")
    return supported[0]


# --------------------------------------------------------------------------------------------
# Parameter names: ours -> HF.  A tuple of HF names means "rows concatenated" (our fused qkv).
# --------------------------------------------------------------------------------------------
BERT_LAYER = {"attention.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
              "attention.out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn_norm": "output.LayerNorm"}
MEGATRON_LAYER = dict(BERT_LAYER, attention_norm="attention.ln", ffn_norm="ln")
EMBEDDING_TABLES = ("embeddings.word", "embeddings.position", "embeddings.token_type")  # weight only
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
    modules = _albert_modules(m) if m.arch == "albert" else _bert_modules(m)
    names = {}
    for ours, hf in modules.items():
        for param in ("weight",) if ours in EMBEDDING_TABLES else ("weight", "bias"):
            names[f"{ours}.{param}"] = _prefixed("", hf, suffix=f".{param}")
    head = "predictions" if m.arch == "albert" else "cls.predictions"
    names["mlm_head.decoder_bias"] = f"{head}.bias"
    return names


def tied_copies(m: ModelConfig) -> dict:
    """{HF name: HF name it is a copy of}: the decoder tied to the word embeddings and its bias."""
    head, base = ("predictions", "albert") if m.arch == "albert" else ("cls.predictions", "bert")
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
def to_hf_state_dict(state_dict: dict, m: ModelConfig) -> dict:
    """Our consolidated state dict (vocabulary trimmed) -> the HF state dict of hf_architecture(m)."""
    import torch
    from pretrain.model import trim_vocab
    state_dict = trim_vocab(state_dict, m)
    expected = _expected_ours(m)
    names = {k: v for k, v in key_map(m).items() if k in expected}
    missing = sorted(set(names) - set(state_dict))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} parameter(s) a model.{m.arch} model needs: "
                         f"{', '.join(missing[:5])}")
    hf = {}
    for ours, theirs in names.items():
        if isinstance(theirs, tuple):
            hf.update(zip(theirs, state_dict[ours].chunk(len(theirs), dim=0)))
        else:
            hf[theirs] = state_dict[ours]
    if m.arch == "albert" and m.embedding_size is None:  # E == H without projection: identity mapping
        hf["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(m.hidden_size)
        hf["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(m.hidden_size)
    for copy, source in tied_copies(m).items():
        hf[copy] = hf[source]
    return {k: v.contiguous() for k, v in hf.items()}


def from_hf_state_dict(hf: dict, m: ModelConfig, source: str = "HF state dict") -> dict:
    """An HF state dict (of the class model_config_from_hf derived m from) -> our consolidated state dict."""
    import torch
    for copy, original in tied_copies(m).items():
        if copy in hf and original in hf and not torch.equal(hf[copy], hf[original]):
            raise ValueError(f"{source}: {copy} differs from {original}; an untied MLM decoder is not supported")
    expected = _expected_ours(m)
    names = {k: v for k, v in key_map(m).items() if k in expected}
    wanted = [h for v in names.values() for h in (v if isinstance(v, tuple) else (v,))]
    missing = [h for h in wanted if h not in hf]
    if missing:
        raise ValueError(f"{source}: lacks {len(missing)} expected weight(s): {', '.join(missing[:5])}")
    return {ours: (torch.cat([hf[h] for h in theirs]) if isinstance(theirs, tuple) else hf[theirs]).float().clone()
            for ours, theirs in names.items()}


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
    from pretrain.weights import TOKENIZER_DIR, load_weights, resolve_checkpoint_dir
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    config, state_dict, extra = load_weights(ckpt_dir)
    m = config.model
    architecture = hf_architecture(m)
    own = os.path.join(ckpt_dir, TOKENIZER_DIR)
    tokenizer_dir = tokenizer_dir or (own if os.path.isdir(own) else None) or extra.get("tokenizer_dir") \
        or config.data.tokenizer
    recorded = (extra.get("fingerprints") or {}).get("tokenizer")
    if tokenizer_dir and recorded:
        _check_tokenizer_hash(tokenizer_dir, recorded, ckpt_dir)
    spec = _tokenizer_spec(tokenizer_dir, m) if tokenizer_dir else None  # bad tokenizer: fail before writing
    model = getattr(transformers, architecture)(hf_config(m))
    model.load_state_dict(to_hf_state_dict(state_dict, m), strict=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if spec:
        export_tokenizer(tokenizer_dir, out_dir, spec)
    else:
        warnings.warn(f"no tokenizer known for {checkpoint} (pass --tokenizer DIR): {out_dir} has the weights "
                      "but no tokenizer files, so AutoTokenizer.from_pretrained will not load it", stacklevel=2)
    return {"architecture": architecture, "out_dir": out_dir, "tokenizer": tokenizer_dir or None}


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
    """Copy tokenizer.json / vocab.txt and write a tokenizer_config.json AutoTokenizer understands."""
    for name in spec["files"]:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    if spec["vocab"] and "vocab.txt" not in spec["files"]:
        with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token in sorted(spec["vocab"], key=spec["vocab"].get))
    settings = dict(SPECIAL_TOKENS, tokenizer_class=spec["class"], do_lower_case=spec["lowercase"],
                    model_max_length=spec["model_max_length"])
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
    spec = {"files": files, "class": "BertTokenizerFast", "lowercase": None, "strip_accents": None,
            "vocab": None, "model_max_length": m.max_position_embeddings}
    if "tokenizer.json" in files:
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
        if model.get("type") == "WordPiece":
            spec["vocab"] = model.get("vocab")
        else:
            spec["class"] = "PreTrainedTokenizerFast"
        spec["lowercase"], spec["strip_accents"] = normalizer_flags(data.get("normalizer"))
    if spec["vocab"] is None and "vocab.txt" in files:
        with open(os.path.join(tokenizer_dir, "vocab.txt"), encoding="utf-8") as f:
            spec["vocab"] = {line.rstrip("\n"): i for i, line in enumerate(f)}
    if spec["vocab"] and len(spec["vocab"]) > m.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(spec['vocab'])} tokens but model.vocab_size is "
                         f"{m.vocab_size}")
    if spec["lowercase"] is None:  # a bare vocab.txt: as data_prep reads it, uncased unless declared
        spec["lowercase"] = declared_lowercase(tokenizer_dir)
    return spec


def import_hf(hf_dir: str, out_dir: str) -> Config:
    """Write our consolidated-weights checkpoint (model.pt + config.yaml) from a transformers directory.

    The tokenizer files found there are copied to OUT/tokenizer and recorded in extra.json.
    """
    import transformers
    from pretrain.model import build_model
    from pretrain.weights import TOKENIZER_DIR, copy_tokenizer, save_weights
    hf_cfg = _read_hf_config(hf_dir)
    m = model_config_from_hf(hf_cfg, os.path.join(hf_dir, "config.json"))
    config = config_from_dict(_config_dict(m), source=os.path.join(hf_dir, "config.json"))
    for path in _hf_weight_files(hf_dir):
        _check_weights_file(path)
    try:
        hf_model = getattr(transformers, _architecture_of(hf_cfg, hf_dir)).from_pretrained(hf_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{hf_dir}: transformers could not load the model ({str(err).strip().splitlines()[0]})") \
            from None
    state_dict = from_hf_state_dict(hf_model.state_dict(), m, source=hf_dir)
    build_model(m).load_consolidated_state_dict(state_dict)  # fails loudly if the mapping missed anything
    extra = {"source": {"format": "huggingface", "dir": os.path.abspath(hf_dir)}}
    tokenizer_dir = copy_tokenizer(hf_dir, os.path.join(out_dir, TOKENIZER_DIR))
    if tokenizer_dir:
        extra["tokenizer_dir"] = tokenizer_dir
    save_weights(out_dir, config, state_dict, extra)
    return config


def _read_hf_config(hf_dir: str):
    import transformers
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF model directory not found: {hf_dir}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: expected a transformers model directory with config.json")
    data = read_json_object(path)
    model_type = data.get("model_type")
    if model_type not in ("bert", "megatron-bert", "albert"):
        raise ValueError(f"{path}: model_type {model_type!r} (architectures {data.get('architectures')}) is not "
                         f"supported; expected one of {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
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


def _config_dict(m: ModelConfig) -> dict:
    """Config tree for an imported model: its model section, training lengths that fit it."""
    seq_len = min(TrainingConfig.seq_len, m.max_position_embeddings)
    return {"model": dataclasses.asdict(m),
            "training": {"seq_len": seq_len, "max_predictions": min(TrainingConfig.max_predictions, seq_len)}}

