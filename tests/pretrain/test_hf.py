"""Consolidated weights, HuggingFace export/import parity, tokenizer export, CLI.  Tiny CPU models.

transformers never touches the network here: configs are built in the test, models are saved to
and loaded from tmp_path.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from tokenizers import BertWordPieceTokenizer  # noqa: E402

from pretrain.cli import main  # noqa: E402
from pretrain.config import Config, ModelConfig, load_config, max_seq_len  # noqa: E402
from pretrain.hf import export_checkpoint  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.weights import load_model, load_weights, save_weights  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 101
WORDS = ["the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "##es", "##ed", "##s", "a"]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position_embeddings=64)
    return ModelConfig(**{**base, **overrides})


def run_config(model_cfg: ModelConfig) -> Config:
    cfg = Config(model=model_cfg)
    cfg.training.seq_len = max_seq_len(model_cfg)
    return cfg


def perturb(model):
    """Move every parameter off its init (LayerNorm 1/0, zero biases) so name mix-ups would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_inputs(seed: int = 0) -> dict:
    """Three rows of 12 ids with padding (rows 1 and 2), two segments."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 5:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def roberta_inputs(inputs: dict) -> dict:
    """padded_inputs as a RoBERTa batch: one token type, its padding id 1 in the padding slots (transformers
    counts positions from the ids)."""
    input_ids = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)
    return {**inputs, "input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}


def padded_batch():
    positions = torch.tensor([[1, 3, 6, 10], [2, 5, 7, 0], [1, 3, 0, 0]])
    return padded_inputs(), positions


def assert_rel_close(got, expected, tol=1e-5):
    """max |got - expected| <= tol * max |expected| (relative to the logits' scale)."""
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item() / expected.abs().max().item()
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def hf_logits(hf_model, inputs, positions):
    """(MLM logits gathered at positions as [B*P, V], sentence logits or None) of an HF model."""
    with torch.no_grad():
        out = hf_model(**inputs)
    logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
    gathered = logits[torch.arange(logits.size(0))[:, None], positions].reshape(-1, logits.size(-1))
    sentence = getattr(out, "seq_relationship_logits", None)
    sentence = getattr(out, "sop_logits", None) if sentence is None else sentence
    return gathered, sentence


def load_hf(hf_dir, architecture):
    model, info = getattr(transformers, architecture).from_pretrained(
        hf_dir, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def write_tokenizer(directory, lowercase=True, files=("tokenizer.json", "vocab.txt")):
    """A tiny WordPiece tokenizer directory, as data_prep leaves it (or only some of its files)."""
    os.makedirs(directory, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ([] if lowercase else ["The"])
    vocab_path = os.path.join(directory, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    if "tokenizer.json" in files:
        BertWordPieceTokenizer(vocab_path, lowercase=lowercase).save(os.path.join(directory, "tokenizer.json"))
    if "vocab.txt" not in files:
        os.remove(vocab_path)  # tokenizer.json alone must be enough (vocab.txt is then derived)
    elif not lowercase:  # a bare cased vocab.txt says so in tokenizer_config.json (uncased is the default)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"do_lower_case": False}, f)
    return str(directory)


def save_ours(tmp_path, model_cfg, extra=None, name="ckpt"):
    model = perturb(build_model(model_cfg))
    ckpt = str(tmp_path / name)
    save_weights(ckpt, run_config(model_cfg), model.state_dict(), extra)
    return model, ckpt


# ---------------------------------------------------------------------------------------------
# Consolidated-weights format
# ---------------------------------------------------------------------------------------------
def test_save_and_load_weights_round_trip(tmp_path):
    model_cfg = tiny()
    model, ckpt = save_ours(tmp_path, model_cfg, extra={"tokenizer_dir": "/tok", "fingerprints": {"data": "ab"}})
    assert sorted(os.listdir(ckpt)) == ["config.yaml", "extra.json", "model.pt"]  # no temp files left
    config, state_dict, extra = load_weights(ckpt)
    assert config == run_config(model_cfg)
    assert extra == {"tokenizer_dir": "/tok", "fingerprints": {"data": "ab"}}
    assert state_dict["embeddings.word.weight"].shape == (VOCAB, 32)  # stored unpadded
    for key, tensor in model.consolidated_state_dict().items():
        assert torch.equal(state_dict[key], tensor), key
    loaded, _, _ = load_model(ckpt)
    inputs, positions = padded_batch()
    torch.testing.assert_close(loaded(**inputs, masked_lm_positions=positions).mlm_logits,
                               model(**inputs, masked_lm_positions=positions).mlm_logits)


def test_save_weights_strips_wrapper_prefixes(tmp_path):
    model_cfg = tiny()
    model = build_model(model_cfg)
    wrapped = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    save_weights(str(tmp_path / "c"), run_config(model_cfg), wrapped)
    assert set(load_weights(str(tmp_path / "c"))[1]) == set(model.state_dict())
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_weights(str(tmp_path / "d"), run_config(model_cfg), model.state_dict(), extra={"x": object()})


def test_load_weights_follows_latest(tmp_path):
    _, ckpt = save_ours(tmp_path / "checkpoints", tiny(), name="step-000100")
    (tmp_path / "checkpoints" / "latest").write_text("step-000100\n")
    config, state_dict, _ = load_weights(str(tmp_path / "checkpoints"))
    assert config.model == tiny() and "encoder.layers.1.ffn.up.weight" in state_dict
    assert load_weights(os.path.join(ckpt, "model.pt"))[0] == config


def test_load_weights_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")):
        load_weights(missing)
    (tmp_path / "empty").mkdir()
    expected = f"{tmp_path / 'empty'}: expected a checkpoint directory holding model.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_weights(str(tmp_path / "empty"))
    (tmp_path / "empty" / "latest").write_text("step-000007")
    with pytest.raises(FileNotFoundError, match="latest names 'step-000007'"):
        load_weights(str(tmp_path / "empty"))
    _, ckpt = save_ours(tmp_path, tiny())
    os.remove(os.path.join(ckpt, "config.yaml"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{ckpt}: holds model.pt but no config.yaml")):
        load_weights(ckpt)


# ---------------------------------------------------------------------------------------------
# Export parity: ours -> HF
# ---------------------------------------------------------------------------------------------
EXPORT_CASES = {
    "bert_nsp": (tiny(), "BertForPreTraining"),
    "bert_no_sentence_head": (tiny(sentence_head="none"), "BertForMaskedLM"),
    "bert_pre_ln": (tiny(layer_norm_position="pre"), "MegatronBertForPreTraining"),
    "albert_factorized_shared": (tiny(arch="albert", embedding_size=16, share_layers=True, num_layers=3,
                                      sentence_head="sop", hidden_act="gelu_tanh"), "AlbertForPreTraining"),
    "albert_factorized_unshared": (tiny(arch="albert", embedding_size=16, sentence_head="sop"),
                                   "AlbertForPreTraining"),
    "albert_no_projection": (tiny(arch="albert", sentence_head="sop", share_layers=True), "AlbertForPreTraining"),
    "albert_no_sentence_head": (tiny(arch="albert", embedding_size=16, sentence_head="none"), "AlbertForMaskedLM"),
    "roberta": (tiny(arch="roberta", sentence_head="none"), "RobertaForMaskedLM"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers(tmp_path, case):
    model_cfg, architecture = EXPORT_CASES[case]
    model, ckpt = save_ours(tmp_path, model_cfg)
    with pytest.warns(UserWarning, match="no tokenizer known"):
        summary = export_checkpoint(ckpt, str(tmp_path / "hf"))
    assert summary["architecture"] == architecture
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    hf_model = load_hf(str(tmp_path / "hf"), architecture)
    assert hf_model.config.vocab_size == VOCAB  # never the padded size
    inputs, positions = padded_batch()
    if model_cfg.arch == "roberta":
        inputs = roberta_inputs(inputs)
    with torch.no_grad():
        ours = model(**inputs, masked_lm_positions=positions)
    hf_mlm, hf_sentence = hf_logits(hf_model, inputs, positions)
    real = inputs["attention_mask"][torch.arange(3)[:, None], positions].reshape(-1).bool()
    assert_rel_close(ours.mlm_logits[real], hf_mlm[real])
    if model_cfg.arch == "roberta":       # every position, the padding's too (at RoBERTa's padding index)
        with torch.no_grad():
            full = hf_model(**inputs).logits
        assert_rel_close(model.mlm_logits(model.encode(**inputs)), full.reshape(-1, full.size(-1)))
    if model_cfg.sentence_head == "none":
        assert ours.sentence_logits is None and hf_sentence is None
    else:
        assert_rel_close(ours.sentence_logits, hf_sentence)


@pytest.mark.parametrize("case", ["bert_nsp", "albert_factorized_shared"])
def test_exported_sentence_head_matches_in_train_mode(tmp_path, case):
    """With hidden and attention dropout off, no dropout is left in either model: train-mode
    sentence logits agree (HF's ALBERT SOP head drops out by classifier_dropout_prob)."""
    model_cfg, architecture = EXPORT_CASES[case]
    model_cfg = dataclasses.replace(model_cfg, hidden_dropout=0.0, attention_dropout=0.0)
    model, ckpt = save_ours(tmp_path, model_cfg)
    with pytest.warns(UserWarning, match="no tokenizer known"):
        export_checkpoint(ckpt, str(tmp_path / "hf"))
    hf_model = load_hf(str(tmp_path / "hf"), architecture).train()
    inputs, positions = padded_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        ours = model.train()(**inputs, masked_lm_positions=positions)
        _, hf_sentence = hf_logits(hf_model, inputs, positions)
    assert_rel_close(ours.sentence_logits, hf_sentence)


def test_pre_ln_albert_cannot_be_exported(tmp_path):
    _, ckpt = save_ours(tmp_path, tiny(arch="albert", sentence_head="sop", layer_norm_position="pre"))
    with pytest.raises(ValueError, match="layer_norm_position=pre with model.arch=albert has no HuggingFace"):
        export_checkpoint(ckpt, str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------
# Import parity: HF -> ours
# ---------------------------------------------------------------------------------------------
def hf_common(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    return {**base, **overrides}


IMPORT_CASES = {
    "BertForPreTraining": lambda: transformers.BertConfig(**hf_common()),
    "BertForMaskedLM": lambda: transformers.BertConfig(**hf_common(hidden_act="gelu_new")),
    "MegatronBertForPreTraining": lambda: transformers.MegatronBertConfig(**hf_common()),
    "AlbertForPreTraining": lambda: transformers.AlbertConfig(**hf_common(embedding_size=16, num_hidden_layers=3)),
    "AlbertForPreTraining-unshared": lambda: transformers.AlbertConfig(
        **hf_common(embedding_size=16, num_hidden_groups=2, hidden_act="gelu")),
    "AlbertForMaskedLM": lambda: transformers.AlbertConfig(**hf_common(embedding_size=32)),
    "RobertaForMaskedLM": lambda: transformers.RobertaConfig(**hf_common(pad_token_id=1, type_vocab_size=1)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(tmp_path, case):
    architecture = case.split("-")[0]
    torch.manual_seed(0)
    hf_model = perturb(getattr(transformers, architecture)(IMPORT_CASES[case]()))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    model, config, extra = load_model(str(tmp_path / "ours"))
    assert extra["source"]["format"] == "huggingface" and "tokenizer_dir" not in extra
    m = config.model
    assert m.arch == ("albert" if case.startswith("Albert") else "roberta" if case.startswith("Roberta") else "bert")
    assert m.num_layers == hf_model.config.num_hidden_layers
    assert m.hidden_dropout == hf_model.config.hidden_dropout_prob
    assert m.sentence_head == ("none" if case.endswith("MaskedLM") else "sop" if "Albert" in case else "nsp")
    assert m.share_layers == (case in ("AlbertForPreTraining", "AlbertForMaskedLM"))  # HF default: 1 group
    assert load_config(str(tmp_path / "ours" / "config.yaml")) == config  # a valid run config
    inputs, positions = padded_batch()
    if m.arch == "roberta":
        inputs = roberta_inputs(inputs)
    hf_model = load_hf(str(tmp_path / "hf"), architecture)
    with torch.no_grad():
        ours = model(**inputs, masked_lm_positions=positions)
    hf_mlm, hf_sentence = hf_logits(hf_model, inputs, positions)
    real = inputs["attention_mask"][torch.arange(3)[:, None], positions].reshape(-1).bool()
    assert_rel_close(ours.mlm_logits[real], hf_mlm[real])
    if hf_sentence is not None:
        assert_rel_close(ours.sentence_logits, hf_sentence)


def test_export_then_import_round_trips_exactly(tmp_path):
    _, extra = round_trip(tmp_path, tiny(arch="albert", embedding_size=16, share_layers=True, sentence_head="sop"))
    assert sorted(os.listdir(extra["tokenizer_dir"])) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]


def round_trip(tmp_path, model_cfg: ModelConfig):
    """Our checkpoint of ``model_cfg`` exported with a tokenizer to tmp_path/hf and imported back: every
    tensor and the model config come back exactly.  Returns (the model, the import's extra)."""
    model, ckpt = save_ours(tmp_path, model_cfg)
    tokenizer = write_tokenizer(tmp_path / "tok")
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "hf"), "--tokenizer", tokenizer]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    config, state_dict, extra = load_weights(str(tmp_path / "back"))
    assert config.model == model_cfg
    original = model.consolidated_state_dict()
    assert set(state_dict) == set(original)
    for key in original:
        assert torch.equal(state_dict[key], original[key]), key
    return model, extra


def test_exported_and_imported_files_follow_the_umask(tmp_path):
    """Not mkstemp's (or transformers') 0600: a group that shares a directory can read what a run wrote."""
    model, ckpt = save_ours(tmp_path, tiny())
    old = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "hf"),
                     "--tokenizer", write_tokenizer(tmp_path / "tok")]) == 0
        assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    written = [p for d in ("hf", "back") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written) and any(p.name == "model.pt" for p in written)
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written} == \
        {str(p.relative_to(tmp_path)): "0o644" for p in written}


# ---------------------------------------------------------------------------------------------
# Tokenizer export
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lowercase,files", [(True, ("tokenizer.json", "vocab.txt")), (False, ("tokenizer.json",)),
                                             (True, ("vocab.txt",)), (False, ("vocab.txt",))],
                         ids=["uncased", "cased_tokenizer_json_only", "uncased_vocab_txt_only",
                              "cased_vocab_txt_only"])
def test_exported_tokenizer_round_trips_with_auto_tokenizer(tmp_path, lowercase, files):
    tokenizer_dir = write_tokenizer(tmp_path / "tok", lowercase=lowercase, files=files)
    _, ckpt = save_ours(tmp_path, tiny())
    export_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(tokenizer, transformers.BertTokenizerFast)
    ids = tokenizer("The quick brown foxes jumped")["input_ids"]
    first = "the" if lowercase else "The"
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", first, "quick", "brown", "fox", "##es", "jump",
                                                    "##ed", "[SEP]"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"{first} quick brown foxes jumped"
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["do_lower_case"] is lowercase
    assert (tmp_path / "hf" / "vocab.txt").read_text().split("\n")[5:8] == ["the", "quick", "brown"]


def test_exported_tokenizer_keeps_a_sequence_normalizers_lowercasing_and_accent_stripping(tmp_path):
    """A tokenizer.json whose normalizer is Sequence[NFD, Lowercase, StripAccents] (not BertNormalizer):
    data_prep.vocab.normalizer_flags reads both flags, so the export strips accents like the original."""
    tokenizer_dir = write_tokenizer(tmp_path / "tok", files=("tokenizer.json",))
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    spec = json.loads(open(path, encoding="utf-8").read())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"},
                                                               {"type": "StripAccents"}]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    _, ckpt = save_ours(tmp_path, tiny())
    export_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer_dir)
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["do_lower_case"] is True and settings["strip_accents"] is True
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.tokenize("Thé QUÍCK fox") == ["the", "quick", "fox"]


def test_export_uses_the_tokenizer_recorded_in_the_checkpoint(tmp_path):
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    _, ckpt = save_ours(tmp_path, tiny(), extra={"tokenizer_dir": tokenizer_dir})
    assert export_checkpoint(ckpt, str(tmp_path / "hf"))["tokenizer"] == tokenizer_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.tokenize("Lazy dogs") == ["lazy", "dog", "##s"]


def test_tokenizer_larger_than_the_model_vocabulary_is_rejected(tmp_path):
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    _, ckpt = save_ours(tmp_path, tiny(vocab_size=10))
    with pytest.raises(ValueError, match="has 17 tokens but model.vocab_size is 10"):
        export_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Command line and bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,flag", [("export", "--checkpoint"), ("import", "--hf")])
def test_cli_help(command, flag):
    result = subprocess.run([sys.executable, "-m", "pretrain", command, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout and "--out" in result.stdout


def test_export_errors_name_the_path(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main(["export", "--checkpoint", missing, "--out", str(tmp_path / "hf")]) == 1
    assert f"export: error: checkpoint not found: {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "no_weights").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "no_weights"), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no_weights'}: expected a checkpoint directory holding model.pt" in err
    _, ckpt = save_ours(tmp_path, tiny())
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "hf"), "--tokenizer", str(tmp_path)]) == 1
    assert f"tokenizer directory {tmp_path}: expected tokenizer.json or vocab.txt" in capsys.readouterr().err


def test_import_errors_name_the_path(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["import", "--hf", str(tmp_path / "missing"), "--out", out]) == 1
    assert f"HF model directory not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "no_config").mkdir()
    assert main(["import", "--hf", str(tmp_path / "no_config"), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no_config'}: expected a transformers model directory with config.json" in err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["import", "--hf", str(gpt2), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"{gpt2 / 'config.json'}: model_type 'gpt2'" in err and "AlbertForPreTraining" in err
    transformers.BertConfig(**hf_common(), architectures=["BertModel"]).save_pretrained(str(tmp_path / "encoder"))
    assert main(["import", "--hf", str(tmp_path / "encoder"), "--out", out]) == 1
    assert "architectures ['BertModel'] (model_type 'bert') is not supported" in capsys.readouterr().err
    grouped = transformers.AlbertConfig(**hf_common(num_hidden_layers=4, num_hidden_groups=2),
                                        architectures=["AlbertForPreTraining"])
    grouped.save_pretrained(str(tmp_path / "grouped"))
    assert main(["import", "--hf", str(tmp_path / "grouped"), "--out", out]) == 1
    assert "num_hidden_groups=2, inner_group_num=1 is not supported" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_export_refuses_a_tokenizer_other_than_the_recorded_one(tmp_path):
    """A checkpoint without its own tokenizer copy names one by path; if the directory found there
    is not the tokenizer the run was trained with (its recorded hash), export refuses."""
    from pathlib import Path

    from data_prep.vocab import load_tokenizer_dir
    trained = load_tokenizer_dir(Path(write_tokenizer(tmp_path / "trained")))[1].sha256
    other = write_tokenizer(tmp_path / "other", lowercase=False)
    _, ckpt = save_ours(tmp_path, tiny(), extra={"tokenizer_dir": other, "fingerprints": {"tokenizer": trained}})
    with pytest.raises(ValueError, match=f"tokenizer {re.escape(other)} hashes to .* but {re.escape(ckpt)} was "
                                         f"trained with tokenizer {trained}"):
        export_checkpoint(ckpt, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _hf_dir_with(tmp_path, damage):
    """A saved BertForPreTraining directory, then damaged by ``damage(directory)``."""
    hf_dir = tmp_path / "hf"
    transformers.BertForPreTraining(transformers.BertConfig(**hf_common())).save_pretrained(str(hf_dir))
    damage(hf_dir)
    return hf_dir


def _as_bin(hf_dir, extra=None):
    state_dict = dict(transformers.BertForPreTraining.from_pretrained(str(hf_dir)).state_dict(), **(extra or {}))
    (hf_dir / "model.safetensors").unlink()
    torch.save(state_dict, hf_dir / "pytorch_model.bin")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


IMPORT_DAMAGE = {
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "config_not_an_object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             "config.json: expected a JSON object"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no weights: expected model.safetensors"),
    "truncated_safetensors": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors: not a readable"),
    "truncated_bin": (lambda d: (_as_bin(d), _truncate(d / "pytorch_model.bin")), "pytorch_model.bin: not a readable"),
}


@pytest.mark.parametrize("case", list(IMPORT_DAMAGE))
def test_import_of_a_damaged_directory_names_the_file(tmp_path, capsys, case):
    damage, expected = IMPORT_DAMAGE[case]
    hf_dir = _hf_dir_with(tmp_path, damage)
    capsys.readouterr()   # transformers' progress bars while the directory was made
    assert main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("import: error: "), err
    assert f"{hf_dir}{os.sep}{expected}" in err or f"{hf_dir}: {expected}" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_import_refuses_a_payload_in_pytorch_model_bin(tmp_path, capsys):
    marker = tmp_path / "marker"
    hf_dir = _hf_dir_with(tmp_path, lambda d: _as_bin(d, {"payload": _Payload(marker)}))
    capsys.readouterr()
    assert main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 1
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert f"{hf_dir / 'pytorch_model.bin'}: refused: it would unpickle exec" in err and len(err.splitlines()) == 1
