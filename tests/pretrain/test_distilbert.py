"""model.arch: distilbert: its config rules, its shape (no token types), DistilBertForMaskedLM export and
import parity against transformers, byte round trip, tokenizer export.  Tiny CPU models, no network:
the HF models are built from a DistilBertConfig here (the fine-tuning heads: tests/finetune/test_distilbert.py).
"""
import dataclasses
import json
import warnings

import pytest
import torch

from tests.pretrain.test_hf import (VOCAB, assert_rel_close, load_hf, padded_inputs, perturb, round_trip, save_ours,
                                    tiny, transformers)
from data_prep.settings import ConfigError, ConfigWarning
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.hf import export_checkpoint
from pretrain.model import build_model
from pretrain.weights import load_model

DISTILBERT = tiny(arch="distilbert", sentence_head="none")


def hf_inputs(inputs: dict) -> dict:
    """A batch as DistilBERT takes it: no token_type_ids."""
    return {k: v for k, v in inputs.items() if k != "token_type_ids"}


def every_position(model, inputs):
    """Our MLM logits at every position [B*S, V] (the padding's included)."""
    with torch.no_grad():
        return model.mlm_logits(model.encode(**inputs))


def hf_every_position(hf_model, inputs):
    with torch.no_grad():
        logits = hf_model(**hf_inputs(inputs)).logits
    return logits.reshape(-1, logits.size(-1))


def distilbert_config(**overrides):
    """A tiny DistilBertConfig with the keys distilbert-base-uncased's config.json has (transformers 5 reads
    its tie_weights_ as an unknown extra)."""
    keys = dict(activation="gelu", architectures=["DistilBertForMaskedLM"], attention_dropout=0.1, dim=32,
                dropout=0.1, hidden_dim=64, initializer_range=0.02, max_position_embeddings=64, n_heads=4,
                n_layers=2, pad_token_id=0, qa_dropout=0.1, seq_classif_dropout=0.2, sinusoidal_pos_embds=False,
                tie_weights_=True, vocab_size=VOCAB)
    return transformers.DistilBertConfig(**{**keys, **overrides})


# ---------------------------------------------------------------------------------------------
# Config and shape
# ---------------------------------------------------------------------------------------------
def test_config_rules_name_every_conflict():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.arch=distilbert", "model.sentence_head=nsp", "model.layer_norm_position=pre",
                           "model.share_layers=true"])
    assert err.value.problems == [
        "model.embedding_size / model.share_layers are ALBERT options: set model.arch=albert",
        "model.arch=distilbert is post-LN without a sentence head: got model.sentence_head=nsp, "
        "model.layer_norm_position=pre (expected none, post)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(None, ["model.arch=distilbert", "model.sentence_head=none"])
    assert cfg.model.arch == "distilbert"
    with pytest.warns(ConfigWarning, match="model.type_vocab_size=1 has no effect: model.arch=distilbert has no "
                                           "token-type embeddings"):
        load_config(None, ["model.arch=distilbert", "model.sentence_head=none", "model.type_vocab_size=1"])


def test_no_token_type_table_and_segment_ids_are_ignored():
    model = perturb(build_model(DISTILBERT))
    assert not any("token_type" in k for k in model.state_dict())
    assert model.pooler is None and model.sentence_head is None
    inputs = padded_inputs()
    other = {**inputs, "token_type_ids": 1 - inputs["token_type_ids"]}
    assert torch.equal(every_position(model, inputs), every_position(model, other))
    bert = perturb(build_model(dataclasses.replace(DISTILBERT, arch="bert")))     # BERT's table reads them
    assert not torch.equal(every_position(bert, inputs), every_position(bert, other))


# ---------------------------------------------------------------------------------------------
# Export: ours -> DistilBertForMaskedLM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_tanh", "hidden_dropout": 0.2}],
                         ids=["gelu", "gelu_tanh"])
def test_export_matches_transformers_at_every_position(tmp_path, overrides):
    model_cfg = dataclasses.replace(DISTILBERT, **overrides)
    model, ckpt = save_ours(tmp_path, model_cfg)
    with pytest.warns(UserWarning, match="no tokenizer known"):
        assert export_checkpoint(ckpt, str(tmp_path / "hf"))["architecture"] == "DistilBertForMaskedLM"
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "distilbert" and saved["architectures"] == ["DistilBertForMaskedLM"]
    assert (saved["dim"], saved["n_layers"], saved["n_heads"], saved["hidden_dim"]) == (32, 2, 4, 64)
    assert saved["activation"] == ("gelu_new" if overrides else "gelu")
    assert saved["dropout"] == model_cfg.hidden_dropout and saved["vocab_size"] == VOCAB
    assert saved.get("sinusoidal_pos_embds", False) is False and saved.get("tie_word_embeddings", True) is True
    hf_model = load_hf(str(tmp_path / "hf"), "DistilBertForMaskedLM")
    assert hf_model.vocab_projector.weight.data_ptr() == \
        hf_model.distilbert.embeddings.word_embeddings.weight.data_ptr()      # tied, as ours
    inputs = padded_inputs()
    assert_rel_close(every_position(model, inputs), hf_every_position(hf_model, inputs))


def test_train_mode_mlm_loss_matches_transformers_from_one_seed(tmp_path):
    """Dropout on: the same loss from the same seed, so our dropouts are where DistilBERT's are (none after
    the attention's out_lin; after the embeddings' LayerNorm, the attention probabilities, the FFN)."""
    model, ckpt = save_ours(tmp_path, DISTILBERT)
    with pytest.warns(UserWarning, match="no tokenizer known"):
        export_checkpoint(ckpt, str(tmp_path / "hf"))
    hf_model = load_hf(str(tmp_path / "hf"), "DistilBertForMaskedLM").train()
    inputs = padded_inputs()
    labels = torch.full((3, 12), -100)
    labels[:, [1, 3, 6]] = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    model.train()
    torch.manual_seed(5)
    ours = model(**inputs, masked_lm_labels=labels).mlm_loss
    torch.manual_seed(5)
    theirs = hf_model(**hf_inputs(inputs), labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    assert model(**inputs, masked_lm_labels=labels).mlm_loss != ours       # dropout was on


def test_export_refuses_a_layer_norm_eps_transformers_cannot_hold(tmp_path):
    _, ckpt = save_ours(tmp_path, dataclasses.replace(DISTILBERT, layer_norm_eps=1e-5))
    with pytest.raises(ValueError, match=r"config.yaml:\n  - model.layer_norm_eps: got 1e-05 with model.arch=distilbert, "
                                         r"expected 1e-12 \(transformers' DistilBERT has it built in"):
        export_checkpoint(ckpt, str(tmp_path / "hf"))    # a config rule: such a run never trains
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# Import: DistilBertForMaskedLM -> ours
# ---------------------------------------------------------------------------------------------
def test_import_matches_transformers_at_every_position(tmp_path):
    torch.manual_seed(0)
    hf_model = perturb(transformers.DistilBertForMaskedLM(distilbert_config(activation="gelu_new", dropout=0.15)))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    model, config, extra = load_model(str(tmp_path / "ours"))
    assert extra["source"]["format"] == "huggingface"
    m = config.model
    assert (m.arch, m.sentence_head, m.layer_norm_position, m.hidden_act) == ("distilbert", "none", "post", "gelu_tanh")
    assert (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size) == (32, 2, 4, 64)
    assert (m.hidden_dropout, m.attention_dropout, m.layer_norm_eps) == (0.15, 0.1, 1e-12)
    assert load_config(str(tmp_path / "ours" / "config.yaml")) == config       # a valid run config
    inputs = padded_inputs()
    assert_rel_close(every_position(model, inputs), hf_every_position(hf_model.eval(), inputs))


def test_import_refuses_sinusoidal_positions(tmp_path, capsys):
    transformers.DistilBertForMaskedLM(distilbert_config(sinusoidal_pos_embds=True)).save_pretrained(
        str(tmp_path / "hf"))
    capsys.readouterr()                          # transformers' progress bars
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'hf' / 'config.json'}: sinusoidal_pos_embds true is not supported" in err[0]
    assert not (tmp_path / "ours").exists()


def test_export_then_import_round_trips_exactly_with_its_tokenizer(tmp_path):
    model, _ = round_trip(tmp_path, DISTILBERT)
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "DistilBertTokenizerFast"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert type(tokenizer).__name__.startswith("DistilBertTokenizer")
    encoded = tokenizer(["the quick brown foxes jumped", "a lazy dog"], padding=True, return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}     # no token_type_ids: DistilBERT takes none
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist()) == [
        "[CLS]", "the", "quick", "brown", "fox", "##es", "jump", "##ed", "[SEP]"]
    hf_model = load_hf(str(tmp_path / "hf"), "DistilBertForMaskedLM")
    assert_rel_close(every_position(model, dict(encoded)), hf_every_position(hf_model, dict(encoded)))
