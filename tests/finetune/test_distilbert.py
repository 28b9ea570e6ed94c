"""DistilBERT fine-tuning heads against transformers' DistilBertFor* (logits, losses, train-mode losses from
one seed, eight training steps), HF DistilBERT directories as starting points, head dropout round trips, and
one `pretrain finetune` run on a tiny distilbert checkpoint.  Tiny CPU fp32 models, no network.
"""
import dataclasses
import json

import pytest
import torch

from tests.finetune.test_model import (HEADS, eight_steps, export, load_hf, outputs, same_outputs_and_losses,
                                      targets)
from tests.finetune.test_train import classification_files, corpus_lines, finetune, read_jsonl
from tests.pretrain.test_distilbert import DISTILBERT, distilbert_config, hf_inputs
from tests.pretrain.test_hf import assert_rel_close, padded_inputs, perturb, run_config, transformers, write_tokenizer
from data_prep.vocab import save_tokenizer_dir, train_wordpiece
from pretrain.config import ModelConfig
from pretrain.finetune.model import FinetuneModel, HeadConfig, from_pretrained
from pretrain.hf import export_finetuned
from pretrain.model import build_model
from pretrain.weights import save_weights


def distilbert_model(head_case, **model_overrides):
    torch.manual_seed(0)
    return perturb(FinetuneModel(dataclasses.replace(DISTILBERT, **model_overrides), HEADS[head_case][0]))


@pytest.mark.parametrize("head_case", list(HEADS))
def test_export_matches_transformers_in_eval_and_train_mode(tmp_path, head_case):
    """Eval mode: every position's logits and the loss.  Train mode with dropout on: the same loss from the
    same seed, so the heads' dropouts (seq_classif_dropout after pre_classifier's ReLU, dropout before the
    token classifier, qa_dropout before qa_outputs) are where transformers has them."""
    model = distilbert_model(head_case)
    architecture = "DistilBert" + HEADS[head_case][1]
    assert export(model, tmp_path / "hf")["architecture"] == architecture
    hf_model = load_hf(tmp_path / "hf", architecture)
    inputs = padded_inputs()           # ours ignores the token_type_ids; transformers' takes none
    ours = same_outputs_and_losses(model, hf_model, inputs, hf_inputs(inputs))
    torch.manual_seed(6)
    assert model(**inputs, **targets(model.head, inputs)).loss != ours          # dropout was on


def test_sequence_head_is_pre_classifier_relu_classifier():
    """Written out: ReLU(pre_classifier([CLS])) -> classifier, not BERT's tanh pooler."""
    model = distilbert_model("classification")
    inputs = padded_inputs()
    with torch.no_grad():
        cls = model.encode(**inputs)[:, 0]
        expected = torch.nn.functional.linear(torch.clamp(cls @ model.pooler.weight.T + model.pooler.bias, min=0),
                                              model.classifier.weight, model.classifier.bias)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-6, atol=1e-6)


def test_training_follows_transformers_step_by_step(tmp_path):
    """Eight AdamW steps (dropout on, one seed before each step) of ours and of the transformers model of its
    export give the same losses."""
    model = distilbert_model("classification").train()
    export(model, tmp_path / "hf")
    hf_model = load_hf(tmp_path / "hf", "DistilBertForSequenceClassification").train()
    inputs = padded_inputs()
    labels = targets(model.head, inputs)
    runs = [eight_steps(m, {**batch, **labels}, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01))
            for m, batch in ((model, inputs), (hf_model, hf_inputs(inputs)))]
    assert runs[0][-1] < runs[0][0]                        # it trains
    assert runs[0] == pytest.approx(runs[1], rel=1e-5, abs=1e-6)


HF_SOURCES = {    # architecture: (DistilBertConfig settings, the head dropout read from them)
    "DistilBertModel": ({}, 0.2),          # no head: a fresh sequence head's, seq_classif_dropout's default
    "DistilBertForMaskedLM": ({}, 0.2),
    "DistilBertForSequenceClassification": (dict(num_labels=3, seq_classif_dropout=0.3), 0.3),
    "DistilBertForQuestionAnswering": (dict(qa_dropout=0.25), 0.25),
    "DistilBertForTokenClassification": (dict(num_labels=3, dropout=0.2), 0.2),   # its encoder's dropout
}


@pytest.mark.parametrize("architecture", list(HF_SOURCES))
def test_hf_directories_load_as_transformers_reads_them(tmp_path, architecture):
    torch.manual_seed(0)
    settings, dropout = HF_SOURCES[architecture]
    hf_model = perturb(getattr(transformers, architecture)(distilbert_config(**settings)))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    inputs = padded_inputs()
    task = "qa" if architecture.endswith("QuestionAnswering") else "token" if "Token" in architecture else "sequence"
    model, report = from_pretrained(str(tmp_path / "hf"), task, None if task == "qa" else 3)
    assert model.config.arch == "distilbert"
    with torch.no_grad():
        assert_rel_close(model.encode(**inputs), hf_model.base_model(**hf_inputs(inputs)).last_hidden_state)
    if architecture in ("DistilBertModel", "DistilBertForMaskedLM"):    # a fresh head, its pre_classifier too
        assert sorted(report.new) == ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]
    else:                                                                  # the fine-tuned head comes along
        assert report.new == [] and report.unused == []
        with torch.no_grad():
            assert_rel_close(outputs(model(**inputs)), outputs(hf_model(**hf_inputs(inputs))))
    assert model.head.dropout == dropout


@pytest.mark.parametrize("head_case,dropout", [("classification", 0.3), ("qa", 0.25), ("token", 0.1)])
def test_fine_tuned_models_load_back_exactly_with_their_head_dropout(tmp_path, head_case, dropout):
    model = distilbert_model(head_case)
    model = FinetuneModel(model.config, dataclasses.replace(model.head, dropout=dropout))
    export(model, tmp_path / "hf")
    key = {"classification": "seq_classif_dropout", "qa": "qa_dropout", "token": "dropout"}[head_case]
    assert getattr(transformers.AutoConfig.from_pretrained(str(tmp_path / "hf")), key) == dropout
    loaded, report = from_pretrained(str(tmp_path / "hf"))
    assert report.new == [] and loaded.head == model.head
    inputs = padded_inputs()
    with torch.no_grad():
        assert torch.equal(outputs(loaded.eval()(**inputs)), outputs(model.eval()(**inputs)))


def test_token_head_dropout_other_than_the_encoders_warns_on_export(tmp_path):
    """DistilBertForTokenClassification drops out by the encoder's dropout: another head dropout is written
    (classifier_dropout, so that our import reads it back) with a warning."""
    model = distilbert_model("token")
    model = FinetuneModel(model.config, dataclasses.replace(model.head, dropout=0.4))
    with pytest.warns(UserWarning, match=r"DistilBertForTokenClassification drops out by dropout=0.1, not by the "
                                         r"head dropout 0.4"):
        export_finetuned(model, str(tmp_path / "hf"), write_tokenizer(tmp_path / "tok"))
    assert from_pretrained(str(tmp_path / "hf"))[0].head.dropout == 0.4


def test_qa_head_dropout_is_allowed_for_distilbert_only():
    assert FinetuneModel(DISTILBERT, HeadConfig("qa", dropout=0.2)).head.dropout == 0.2
    assert FinetuneModel(DISTILBERT, HeadConfig("qa")).head.dropout == DISTILBERT.hidden_dropout
    with pytest.raises(ValueError, match="a qa head has no dropout"):
        FinetuneModel(dataclasses.replace(DISTILBERT, arch="bert"), HeadConfig("qa", dropout=0.2))


def test_a_sequence_head_drops_out_as_transformers_by_default():
    """head_dropout unset: DistilBertConfig's own default, seq_classif_dropout (not the encoder's dropout)."""
    assert FinetuneModel(DISTILBERT, HeadConfig("sequence", num_labels=2)).head.dropout == \
        transformers.DistilBertConfig().seq_classif_dropout == 0.2
    assert FinetuneModel(DISTILBERT, HeadConfig("token", num_labels=2)).head.dropout == DISTILBERT.hidden_dropout


def test_finetune_command_trains_a_distilbert_checkpoint(tmp_path):
    """`pretrain finetune` on a tiny distilbert checkpoint: it learns, and its HF export is a
    DistilBertForSequenceClassification with a DistilBERT tokenizer that gives our logits."""
    lines = corpus_lines()
    words = " ".join(lines).split()
    tok_dir = tmp_path / "tokenizer"
    tokenizer = train_wordpiece(lambda: lines, 600, lowercase=True)
    save_tokenizer_dir(tokenizer, tok_dir)
    m = ModelConfig(arch="distilbert", sentence_head="none", vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                    num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                    attention_dropout=0.0)
    torch.manual_seed(0)
    save_weights(str(tmp_path / "ckpt"), run_config(m), build_model(m).state_dict(), {"tokenizer_dir": str(tok_dir)})
    train, dev = classification_files(tmp_path, words, n_dev=40)
    out = tmp_path / "out"
    assert finetune("--checkpoint", tmp_path / "ckpt", "--train", train, "--dev", dev, "--out", out,
                    "training.micro_batch_size=16", "training.global_batch_size=16", "training.precision=fp32",
                    "logging.progress_bar=false", "logging.tensorboard=false", "optimizer.lr=2e-3",
                    "model.head_dropout=0.0", "training.epochs=4") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["labels"] == ["no", "yes"] and summary["seeds"]["42"]["accuracy"] >= 0.8, summary
    hf_dir = out / "seed-42" / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["DistilBertForSequenceClassification"]
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "DistilBertTokenizerFast"
    ours, _ = from_pretrained(str(hf_dir))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    batch = tokenizer([r["text"] for r in read_jsonl(dev)[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_rel_close(ours(**batch).logits, theirs(**batch).logits)

