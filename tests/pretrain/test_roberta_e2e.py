"""RoBERTa and Chinese RoBERTa-wwm end to end on CPU, from the shipped configs with tiny overrides:
data_prep (byte-level BPE / character WordPiece + jieba whole words) -> `pretrain train` a few steps ->
`pretrain export` -> transformers loads the directory (AutoTokenizer, RobertaForMaskedLM /
BertForMaskedLM) with our logits to 1e-5 -> `pretrain import` back, the same logits -> `pretrain finetune`.
"""
import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from data_prep.config import load_config as load_prep_config  # noqa: E402
from data_prep.pipeline import run_all  # noqa: E402
from data_prep.shards import read_manifest, split_info  # noqa: E402
from pretrain.cli import main  # noqa: E402
from pretrain.weights import load_model, resolve_checkpoint_dir  # noqa: E402
from tests.finetune.test_train import finetune, write_jsonl  # noqa: E402
from tests.pretrain.test_hf import assert_rel_close  # noqa: E402
from tests.conftest import SHARED_CORPORA  # noqa: E402
from tests.pretrain.training_helpers import DEMO_CORPUS, REPO, Launch, spawn, wait_all  # noqa: E402

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
              "model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
TINY_RUN = ["training.micro_batch_size=8", "training.global_batch_size=8", "training.max_steps=3",
            "training.seq_len=64", "training.max_predictions=10", "training.precision=fp32",
            "schedule.warmup_steps=1", "logging.every_steps=1", "logging.progress_bar=false", "eval.every_steps=0",
            "checkpoint.every_steps=1000", "data.num_workers=0", "zero.stage=0"]
TINY_SHARDS = ["shards.seq_len=64", "shards.max_predictions=10", "shards.val_fraction=0.05",
               "shards.text_per_shard_mb=0.1", "workers=1", "progress=false", "vocab.max_text_mb=null"]


def prep(config: str, corpus, out, vocab_size: int, *more: str):
    """The shipped data config ``config`` on ``corpus`` with small settings; returns the data directory."""
    cfg = load_prep_config(REPO / config, overrides=[f"input.paths=[{corpus}]", f"out={out}", "input.format=text",
                                                     f"vocab.vocab_size={vocab_size}", *TINY_SHARDS, *more])
    run_all(cfg)
    return out


def pretrain(*runs: tuple):
    """`pretrain train` (one rank each, all at once) of each (shipped model config made tiny, data directory,
    run directory, vocab_size, more overrides); returns their checkpoint directories."""
    started = [(run_dir, spawn(run_dir, [f"data.dir={data / 'shards'}", f"data.tokenizer={data / 'tokenizer'}",
                                         f"model.vocab_size={vocab_size}", *TINY_MODEL, *TINY_RUN, *more],
                               nproc=1, config=config))
               for config, data, run_dir, vocab_size, *more in runs]
    out = []
    for run_dir, (procs, logs) in started:
        run = Launch(wait_all(procs, 240), [p.read_text() for p in logs], run_dir)
        assert run.codes == [0], run.explain()
        assert len(run.losses()) == 3 and all(np.isfinite(list(run.losses().values())))
        out.append(run_dir / "checkpoints")
    return out


def our_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return model.mlm_logits(hidden).reshape(*batch["input_ids"].shape, -1)


def hf_logits(hf_model, batch) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(**batch).logits


def demo_lines(n: int) -> list[str]:
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(n), f) if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"roberta": (data, checkpoints, corpus lines), "zh": (data, checkpoints, docs) or None without the
    shared corpora}: both prepared, then both trained at once."""
    root = tmp_path_factory.mktemp("e2e")
    lines = demo_lines(1500)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = {"roberta": (prep("configs/data/roberta.yaml", corpus, root / "data", 1000), lines)}
    jobs = [("configs/roberta-base.yaml", runs["roberta"][0], root / "run", 1000, "model.max_position_embeddings=66")]
    zh_corpus = SHARED_CORPORA / "zh_peoplesdaily1998.txt.gz"
    if zh_corpus.is_file():
        with gzip.open(zh_corpus, "rt", encoding="utf-8") as f:
            docs = [line.strip() for _, line in zip(range(600), f) if line.strip()]
        (root / "zh.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
        runs["zh"] = (prep("configs/data/zh-wwm.yaml", root / "zh.txt", root / "zh_data", 3000), docs)
        jobs.append(("configs/chinese-roberta-wwm-ext.yaml", runs["zh"][0], root / "zh_run", 3000,
                     "model.max_position_embeddings=64"))
    checkpoints = pretrain(*jobs)
    return {name: (data, ckpt, text) for (name, (data, text)), ckpt in zip(runs.items(), checkpoints)}


def test_roberta_prep_train_export_load_import_finetune(trained, tmp_path):
    data, ckpt, lines = trained["roberta"]
    tokenizer_info = json.loads((data / "tokenizer" / "vocab_info.json").read_text())
    assert (tokenizer_info["model"], tokenizer_info["vocab_size"], tokenizer_info["pad_id"]) == ("BPE", 1000, 1)

    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(hf_dir)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert isinstance(hf_tok, transformers.RobertaTokenizerFast)
    hf_model = transformers.RobertaForMaskedLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    texts = [lines[3][:150], "Emma — naïve, “clever” and rich.", lines[40][:60]]
    batch = dict(hf_tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == 1).all() and (batch["input_ids"][:, 0] == 0).all()
    model, _, _ = load_model(resolve_checkpoint_dir(str(ckpt)))
    real = batch["attention_mask"].bool()
    ours = our_logits(model, batch)
    assert_rel_close(ours[real], hf_logits(hf_model, batch)[real])

    back = tmp_path / "back"
    assert main(["import", "--hf", str(hf_dir), "--out", str(back)]) == 0
    imported, config, _ = load_model(str(back))
    assert config.model.arch == "roberta"
    assert_rel_close(our_logits(imported, batch)[real], ours[real])

    # fine-tuning from the export: RoBERTa's pair framing, as transformers lays pairs out
    from data_prep.vocab import read_tokenizer
    from pretrain.finetune.features import encode_classification, encode_squad, encode_tokens
    from pretrain.finetune.tasks import ClassificationExample, QAExample, TokenSentence

    pairs = [ClassificationExample(lines[5], lines[6], "0", "a:1"),
             ClassificationExample("Emma smiled.", "Mr. Knightley did not.", "1", "a:2")]
    features = encode_classification(read_tokenizer(hf_dir), pairs, 48, {"0": 0, "1": 1})
    expected = hf_tok([p.text for p in pairs], [p.text_pair for p in pairs], truncation="longest_first", max_length=48)
    assert [f.input_ids for f in features] == expected["input_ids"]
    assert all(not any(f.token_type_ids) for f in features)
    assert [2, 2] == features[1].input_ids[len(hf_tok("Emma smiled.")["input_ids"]) - 1:][:2]
    words = lines[8].split()[:12]
    (token_feature,) = encode_tokens(read_tokenizer(hf_dir), [TokenSentence(words, None, "a", 1)], 64, None)
    spaced = transformers.RobertaTokenizerFast.from_pretrained(str(hf_dir), add_prefix_space=True)
    assert token_feature.input_ids == spaced(words, is_split_into_words=True)["input_ids"]
    context = lines[9][:200]
    (window,) = encode_squad(read_tokenizer(hf_dir), [QAExample("q", "Who is it?", context, [], True, "a")], 128,
                             64, 16)
    assert window.input_ids == hf_tok("Who is it?", context)["input_ids"] and not any(window.token_type_ids)

    rows = [{"text": a, "text_pair": b, "label": str(int("Emma" in a + b))}
            for a, b in zip(lines[100:260:2], lines[101:261:2])]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:60])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[60:])
    out = tmp_path / "finetuned"
    assert finetune("--checkpoint", hf_dir, "--train", train, "--dev", dev, "--out", out,
                    "task.max_length=64", "training.epochs=1",
                    "training.micro_batch_size=8", "training.global_batch_size=8", "training.precision=fp32",
                    "logging.progress_bar=false", "logging.tensorboard=false") == 0
    (finetuned,) = out.glob("seed-*/hf")
    seq = transformers.RobertaForSequenceClassification.from_pretrained(str(finetuned))
    assert seq.config.architectures == ["RobertaForSequenceClassification"]


def test_chinese_roberta_wwm_prep_train_export_bert(trained, tmp_path):
    if "zh" not in trained:
        pytest.skip(f"shared corpora not found at {SHARED_CORPORA}")
    data, ckpt, docs = trained["zh"]
    info = split_info(read_manifest(data / "shards"), "train")
    assert info["whole_word"] and info["objective"] == "full-sentences"
    tok = json.loads((data / "tokenizer" / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "WordPiece"

    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(hf_dir)]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert isinstance(hf_tok, transformers.BertTokenizerFast)
    text = docs[2][:40]
    pieces = hf_tok.tokenize(text)
    assert all(len(p) == 1 for p in pieces if "\u4e00" <= p[0] <= "\u9fff")  # one character a token
    hf_model = transformers.BertForMaskedLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    batch = dict(hf_tok([text, docs[5][:20]], padding=True, return_tensors="pt"))
    model, _, _ = load_model(resolve_checkpoint_dir(str(ckpt)))
    real = batch["attention_mask"].bool()
    assert_rel_close(our_logits(model, batch)[real], hf_logits(hf_model, batch)[real])


@pytest.mark.parametrize("data_config, model_config", [
    ("configs/data/roberta.yaml", "configs/roberta-base.yaml"),
    ("configs/data/zh-wwm.yaml", "configs/chinese-roberta-wwm-ext.yaml")])
def test_shipped_data_configs_feed_their_model_configs(data_config, model_config):
    from pathlib import Path

    from pretrain.config import load_config, max_seq_len

    prep_cfg, run_cfg = load_prep_config(REPO / data_config), load_config(str(REPO / model_config))
    s, t, m = prep_cfg.shards, run_cfg.training, run_cfg.model
    assert (s.seq_len, s.max_predictions) == (t.seq_len, t.max_predictions) and max_seq_len(m) == t.seq_len
    assert prep_cfg.vocab.vocab_size == m.vocab_size and s.objective == "full-sentences" and m.sentence_head == "none"
    assert Path(prep_cfg.out, "shards") == Path(run_cfg.data.dir) and Path(prep_cfg.out, "tokenizer") == \
        Path(run_cfg.data.tokenizer)
    assert (prep_cfg.vocab.model, m.arch) in (("bpe", "roberta"), ("wordpiece", "bert"))
    assert s.whole_word_mask == (m.arch == "bert")  # the Chinese pair masks whole words
