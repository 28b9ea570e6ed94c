"""`python -m pretrain finetune` end to end on CPU: learnable synthetic tasks built from the demo corpus
(sequence classification, regression, token classification, extractive QA), a tiny checkpoint with a
tokenizer trained on the same text, the real entry point (in process; the 2-rank run as subprocesses).

Checked: dev metrics well above chance, metrics.json per seed with the right mean and std, one prediction
line per dev example, the HF export gives our logits, the best checkpoint is the best evaluation's,
early stopping, layer-wise LR decay in the optimizer's groups, the short form's task inference, bad input
(one line naming the file or key, exit 2, nothing written), a suite of two tasks' table and bad suite
files, 1 rank = 2 ranks at the same global batch.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import string
from pathlib import Path

import pytest
import torch

from tests.pretrain.test_hf import assert_rel_close, run_config, transformers
from tests.pretrain.training_helpers import spawn_ranks, wait_all
from data_prep.vocab import save_tokenizer_dir, train_wordpiece
from pretrain.cli import main
from pretrain.config import ModelConfig
from pretrain.finetune.config import load_finetune_config
from pretrain.finetune.demo_task import bare, mention_rows, windows
from pretrain.finetune.model import FinetuneModel, HeadConfig, from_pretrained
from pretrain.finetune.prepare import epoch_batches, rank_micro_batches
from pretrain.finetune.suite import load_suite
from pretrain.finetune.train import build_finetune_optimizer, layer_depth
from pretrain.model import build_model
from pretrain.weights import save_weights

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz"
NAMES = {"emma", "harriet", "weston", "knightley", "elton", "woodhouse"}
# Small and quick: one rank, fp32, no progress bar; each test adds its own.
QUICK = ["training.micro_batch_size=16", "training.global_batch_size=16", "training.precision=fp32",
         "logging.progress_bar=false", "logging.tensorboard=false", "logging.every_steps=5", "optimizer.lr=2e-3",
         "model.head_dropout=0.0"]


# ---------------------------------------------------------------------------------------------
# Fixtures: text, tokenizer, checkpoint, task files
# ---------------------------------------------------------------------------------------------
def corpus_lines(lines: int = 1500) -> list[str]:
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(lines), f)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(root, tokenizer dir, checkpoint dir, the corpus words): a WordPiece tokenizer trained on the demo
    corpus and a randomly initialised tiny BERT (no dropout: 1 rank = 2 ranks exactly) saved as our checkpoint."""
    root = tmp_path_factory.mktemp("finetune")
    lines = corpus_lines()
    words = " ".join(lines).split()
    tokenizer = train_wordpiece(lambda: lines, 1200, lowercase=True)
    tok_dir = root / "tokenizer"
    save_tokenizer_dir(tokenizer, tok_dir)
    m = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    save_weights(str(ckpt), run_config(m), build_model(m).state_dict(), {"tokenizer_dir": str(tok_dir)})
    return root, tok_dir, ckpt, words


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def classification_files(root: Path, words: list[str], n_train: int = 320, n_dev: int = 80):
    """Does the text name Emma?  The demo's task (pretrain.finetune.demo_task): half the passages with the word."""
    rows = mention_rows(words, "emma", n_train + n_dev)
    return write_jsonl(root / "cls_train.jsonl", rows[:n_train]), write_jsonl(root / "cls_dev.jsonl", rows[n_train:])


def token_files(root: Path, words: list[str], n_train: int = 240, n_dev: int = 60):
    """Names tagged B-PER, every other word O (CoNLL: "word TAG" lines, blank lines between sentences)."""
    sentences = [w for w in windows(words, 10) if any(bare(x) in NAMES for x in w)][:n_train + n_dev]

    def write(path, part):
        path.write_text("".join("".join(f"{x} {'B-PER' if bare(x) in NAMES else 'O'}\n" for x in s) + "\n"
                                for s in part), encoding="utf-8")
        return path
    return write(root / "ner_train.txt", sentences[:n_train]), write(root / "ner_dev.txt", sentences[n_train:])


def qa_files(root: Path, words: list[str], n_train: int = 240, n_dev: int = 60, unanswerable: int = 0):
    """"Who is named?" of a 14-word context holding exactly one name; the answer is the name.  With
    ``unanswerable`` (SQuAD v2), every that-many-th question is asked of a context without a name."""
    examples = []
    for k, w in enumerate(windows(words, 14)):
        names = [i for i, x in enumerate(w) if bare(x) in NAMES]
        context = " ".join(w)
        if unanswerable and not names and len(examples) % unanswerable == 0:
            examples.append({"context": context, "qas": [{"id": f"q{k}", "question": "who is named here?",
                                                          "answers": [], "is_impossible": True}]})
            continue
        if len(names) != 1 or (unanswerable and len(examples) % unanswerable == 0):
            continue
        start = len(" ".join(w[:names[0]])) + (1 if names[0] else 0)
        word = w[names[0]]
        answer = word.strip(string.punctuation + "_")
        start += word.index(answer)
        assert context[start:start + len(answer)] == answer
        examples.append({"context": context, "qas": [{"id": f"q{k}", "question": "who is named here?",
                                                      "answers": [{"text": answer, "answer_start": start}]}]})
    examples = examples[:n_train + n_dev]
    assert len(examples) == n_train + n_dev

    def write(path, part):
        path.write_text(json.dumps({"version": "1.1", "data": [{"title": "emma", "paragraphs": part}]}))
        return path
    return write(root / "qa_train.json", examples[:n_train]), write(root / "qa_dev.json", examples[n_train:])


def finetune(*args: str) -> int:
    """`python -m pretrain finetune ARGS` in this process, as one rank, the environment restored after."""
    saved = dict(os.environ)
    try:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
        os.environ["DS_ACCELERATOR"] = "cpu"
        return main(["finetune", *map(str, args)])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Sequence classification, two seeds: one run checked many ways
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification_run(assets):
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words)
    out = root / "cls_out"
    code = finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, *QUICK,
                    "training.epochs=5", "training.seeds=[1,2]", "eval.every_steps=10", "logging.tensorboard=true")
    assert code == 0
    return out, train, dev


def test_classification_learns_and_reports_every_seed(classification_run, capsys):
    out, _, dev = classification_run
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "classification" and summary["metric"] == "accuracy"
    assert summary["labels"] == ["no", "yes"]
    assert set(summary["seeds"]) == {"1", "2"}
    for seed, values in summary["seeds"].items():
        assert values["accuracy"] >= 0.85, (seed, values)          # chance: 0.5
        assert {"f1", "matthews", "loss", "best_step"} <= set(values)
    for name in ("accuracy", "f1", "loss"):
        a, b = summary["seeds"]["1"][name], summary["seeds"]["2"][name]
        assert summary["mean"][name] == pytest.approx((a + b) / 2, abs=1e-12)
        assert summary["std"][name] == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-12)   # ddof=1
    for seed in ("1", "2"):
        seed_dir = out / f"seed-{seed}"
        assert len(read_jsonl(seed_dir / "predictions.jsonl")) == len(read_jsonl(dev))
        assert list((seed_dir / "tensorboard").iterdir())
        rows = read_jsonl(seed_dir / "metrics.jsonl")
        assert any("train/loss" in r and "train/lr" in r for r in rows if r["kind"] == "train")
        assert (out / "config.yaml").is_file()


def test_best_checkpoint_is_the_best_evaluation(classification_run):
    out, _, dev = classification_run
    summary = json.loads((out / "metrics.json").read_text())
    for seed in ("1", "2"):
        seed_dir = out / f"seed-{seed}"
        evals = [r for r in read_jsonl(seed_dir / "metrics.jsonl") if r["kind"] == "eval"]
        best = max(r["dev/accuracy"] for r in evals)
        first_best = next(r for r in evals if r["dev/accuracy"] == best)
        values = summary["seeds"][seed]
        assert (values["accuracy"], values["best_step"]) == (best, first_best["step"])
        assert values["loss"] == first_best["dev/loss"]
        records = read_jsonl(seed_dir / "predictions.jsonl")
        assert sum(r["prediction"] == r["gold"] for r in records) / len(records) == pytest.approx(best)
        extra = json.loads((seed_dir / "best" / "extra.json").read_text())
        assert extra["finetune"]["step"] == first_best["step"]
        # The saved model's own predictions on the dev file are the logged best evaluation's.
        model, _ = from_pretrained(str(seed_dir / "best"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(seed_dir / "hf"))
        rows = read_jsonl(dev)
        batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        with torch.no_grad():
            pred = model(**batch).logits.argmax(-1).tolist()
        assert [model.head.labels[p] for p in pred] == [r["prediction"] for r in records]


def test_hf_export_gives_our_logits(classification_run):
    out, _, dev = classification_run
    ours, _ = from_pretrained(str(out / "seed-1" / "best"))
    hf_dir = str(out / "seed-1" / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert theirs.config.id2label == {0: "no", 1: "yes"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = tokenizer([r["text"] for r in read_jsonl(dev)[:8]], ["a second text"] * 8, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        assert_rel_close(ours(**batch).logits, theirs(**batch).logits)


def test_an_hf_export_is_a_starting_point_with_its_head(classification_run, capsys):
    """Our export (a transformers directory with its tokenizer) fine-tunes further: the trained head is
    reused, so the first evaluation (at a negligible LR) scores as the best model did."""
    out, train, dev = classification_run
    again = out.parent / "cls_again"
    assert finetune("--checkpoint", out / "seed-1" / "hf", "--train", train, "--dev", dev, "--out", again, *QUICK,
                    "optimizer.lr=1e-12", "training.max_steps=1", "checkpoint.best=false") == 0
    printed = capsys.readouterr().out
    assert "(huggingface)" in printed and "initialised fresh" not in printed
    before = json.loads((out / "metrics.json").read_text())["seeds"]["1"]
    after = json.loads((again / "metrics.json").read_text())["seeds"]["42"]
    assert after["accuracy"] == before["accuracy"] and after["loss"] == pytest.approx(before["loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Token classification and QA
# ---------------------------------------------------------------------------------------------
def test_token_classification_learns_entities(assets):
    root, _, ckpt, words = assets
    train, dev = token_files(root, words)
    out = root / "ner_out"
    assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, "--task", "token", *QUICK,
                    "training.epochs=4", "checkpoint.export_hf=false") == 0
    summary = json.loads((out / "metrics.json").read_text())
    values = summary["seeds"]["42"]
    assert summary["metric"] == "f1" and summary["labels"] == ["B-PER", "O"]
    assert values["f1"] >= 0.8, values                             # all-O scores 0
    records = read_jsonl(out / "seed-42" / "predictions.jsonl")
    assert len(records) == 60 and all(len(r["prediction"]) == len(r["tokens"]) == 10 for r in records)


def test_qa_learns_the_marked_span(assets):
    root, _, ckpt, words = assets
    train, dev = qa_files(root, words)
    out = root / "qa_out"
    assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, "--task", "qa", *QUICK,
                    "training.epochs=4", "task.max_length=48", "qa.max_query_length=8", "qa.doc_stride=16") == 0
    summary = json.loads((out / "metrics.json").read_text())
    values = summary["seeds"]["42"]
    assert summary["metric"] == "f1" and values["f1"] >= 70, values   # a random span of 14 words: far below
    records = read_jsonl(out / "seed-42" / "predictions.jsonl")
    assert len(records) == 60 and {"id", "prediction", "gold"} <= set(records[0])
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(str(out / "seed-42" / "hf"))
    assert type(hf).__name__ == "BertForQuestionAnswering"


def test_qa_v2_learns_when_there_is_no_answer(assets):
    root, _, ckpt, words = assets
    (root / "v2").mkdir(exist_ok=True)
    train, dev = qa_files(root / "v2", words, unanswerable=4)
    out = root / "qa2_out"
    assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, "--task", "qa", *QUICK,
                    "training.epochs=4", "task.max_length=48", "qa.max_query_length=8", "qa.doc_stride=16",
                    "checkpoint.export_hf=false") == 0
    values = json.loads((out / "metrics.json").read_text())["seeds"]["42"]
    assert {"HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(values)
    assert values["f1"] >= 70 and values["NoAns_f1"] >= 50, values
    records = read_jsonl(out / "seed-42" / "predictions.jsonl")
    assert any(r["gold"] == [] for r in records) and all("null_score_diff" in r for r in records)


def test_regression_learns(assets):
    """How many names does the text hold (a number: the task given, not inferred)?"""
    root, _, ckpt, words = assets
    rows = [{"text": " ".join(w), "label": sum(bare(x) in NAMES for x in w)} for w in windows(words, 10)][:400]
    train, dev = write_jsonl(root / "reg_train.jsonl", rows[:320]), write_jsonl(root / "reg_dev.jsonl", rows[320:])
    out = root / "reg_out"
    assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, "--task", "regression",
                    *QUICK, "training.epochs=5", "checkpoint.export_hf=false") == 0
    summary = json.loads((out / "metrics.json").read_text())
    values = summary["seeds"]["42"]
    assert summary["task"] == "regression" and values["pearson"] >= 0.7, values    # chance: 0
    assert values["spearman"] >= 0.3, values          # the gold counts are mostly 0 and 1: ranks are ties
    assert values["pearson_spearman_mean"] == pytest.approx((values["pearson"] + values["spearman"]) / 2)


# ---------------------------------------------------------------------------------------------
# The short form's task inference, early stopping, LLRD, batches
# ---------------------------------------------------------------------------------------------
def test_short_form_infers_classification_or_regression(assets, capsys):
    root, _, ckpt, words = assets
    texts = [" ".join(w) for w in windows(words, 8)[:64]]
    for kind, labels in (("regression", [f"{t.count('e') / 10:.2f}" for t in texts]),
                         ("classification", [str(t.count(",") % 2) for t in texts])):
        tsv = root / f"{kind}.tsv"
        tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in zip(texts, labels)))
        out = root / f"{kind}_out"
        assert finetune("--checkpoint", ckpt, "--train", tsv, "--dev", tsv, "--out", out, *QUICK,
                        "training.max_steps=2", "checkpoint.export_hf=false") == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["task"] == kind
        head = json.loads((out / "seed-42" / "best" / "extra.json").read_text())["finetune_head"]
        if kind == "regression":
            assert summary["metric"] == "pearson_spearman_mean" and {"pearson", "spearman"} <= set(summary["mean"])
            assert (head["num_labels"], head["problem_type"]) == (1, "regression")
        else:
            assert summary["labels"] == ["0", "1"] and "accuracy" in summary["mean"]
            assert (head["num_labels"], head["problem_type"]) == (2, "single_label_classification")
        printed = capsys.readouterr().out
        assert f"task.type=auto: {kind}" in printed and "written to" in printed


def test_early_stopping_stops(assets):
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words, 64, 32)
    out = root / "stop_out"
    assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", out, *QUICK, "optimizer.lr=1e-12",
                    "training.max_steps=40", "eval.every_steps=1", "eval.early_stopping_patience=2",
                    "checkpoint.best=false", "checkpoint.export_hf=false") == 0
    values = json.loads((out / "metrics.json").read_text())["seeds"]["42"]
    assert (values["steps"], values["best_step"], values["early_stopped"]) == (3, 1, True)
    assert len([r for r in read_jsonl(out / "seed-42" / "metrics.jsonl") if r["kind"] == "eval"]) == 3
    assert not (out / "seed-42" / "best").exists()


def test_layer_wise_lr_decay_groups():
    m = ModelConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
                    max_position_embeddings=32)
    model = FinetuneModel(m, HeadConfig("sequence", 3))
    cfg = load_finetune_config(None, ["optimizer.lr=1e-3", "optimizer.layer_lr_decay=0.5",
                                      "optimizer.weight_decay=0.1"],
                               {"model.checkpoint": "x", "task.train": "a", "task.dev": "b"})
    optimizer = build_finetune_optimizer(model, cfg.optimizer)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for name in group["names"]:
            lr_of[name], decay_of[name] = group["lr"], group["weight_decay"]
    assert set(lr_of) == {n for n, _ in model.named_parameters()}
    expected = {"embeddings.word.weight": 1e-3 * 0.5 ** 4, "encoder.layers.0.attention.qkv.weight": 1e-3 * 0.5 ** 3,
                "encoder.layers.1.ffn.up.bias": 1e-3 * 0.5 ** 2, "encoder.layers.2.attention.out.weight": 1e-3 * 0.5,
                "pooler.weight": 1e-3, "classifier.bias": 1e-3}
    for name, lr in expected.items():
        assert lr_of[name] == pytest.approx(lr), name
    assert all(lr_of[n] == pytest.approx(1e-3 * 0.5 ** (4 - layer_depth(n, m))) for n in lr_of)
    assert decay_of["encoder.layers.0.attention.qkv.weight"] == 0.1 and decay_of["encoder.layers.1.ffn.up.bias"] == 0
    assert [g["layer"] for g in optimizer.param_groups] == sorted((g["layer"] for g in optimizer.param_groups),
                                                                   reverse=True)
    plain = build_finetune_optimizer(model, load_finetune_config(
        None, [], {"model.checkpoint": "x", "task.train": "a", "task.dev": "b"}).optimizer)
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {2e-5}


def test_batches_cover_the_epoch_and_split_by_rank():
    lengths = [5 + (i * 7) % 23 for i in range(37)]
    for grouped in (False, True):
        batches = epoch_batches(lengths, 8, seed=3, epoch=1, length_grouped=grouped, group_batches=2)
        assert len(batches) == 5 and all(len(b) == 8 for b in batches)
        flat = [i for b in batches for i in b]
        assert set(flat) == set(range(37)) and len(flat) == 40
        assert batches == epoch_batches(lengths, 8, seed=3, epoch=1, length_grouped=grouped, group_batches=2)
        assert batches != epoch_batches(lengths, 8, seed=3, epoch=2, length_grouped=grouped, group_batches=2)
    grouped = epoch_batches(lengths, 8, seed=3, epoch=1, length_grouped=True, group_batches=2)
    assert sum(max(lengths[i] for i in b) for b in grouped) < sum(
        max(lengths[i] for i in b) for b in epoch_batches(lengths, 8, seed=3, epoch=1))   # less padding
    batch = list(range(16))
    one_rank = rank_micro_batches(batch, 4, accum=4, rank=0)
    two_ranks = rank_micro_batches(batch, 4, accum=2, rank=0) + rank_micro_batches(batch, 4, accum=2, rank=1)
    assert one_rank == two_ranks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_shipped_configs_load():
    shipped = [p for p in sorted((REPO / "configs" / "finetune").glob("*.yaml")) if p.stem != "glue"]
    assert {p.stem for p in shipped} >= {"sst2", "stsb", "conll2003", "squad"}
    types = {load_finetune_config(str(p)).task.type for p in shipped}
    assert types == {"classification", "regression", "token", "qa"}
    suite = load_suite(str(REPO / "configs" / "finetune" / "glue.yaml"))     # the example suite
    assert [t.name for t in suite] == ["sst2", "stsb"]
    assert all(load_finetune_config(t.config, list(t.overrides)) for t in suite)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file or key, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(assets, capsys):
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words, 32, 16)
    cases = {
        "missing file": (["--checkpoint", ckpt, "--train", root / "nope.jsonl", "--dev", dev],
                         ["task.train", "nope.jsonl", "does not exist"]),
        "no checkpoint": (["--checkpoint", root / "no_ckpt", "--train", train, "--dev", dev],
                          ["model.checkpoint", "no_ckpt"]),
        "wrong column": (["--checkpoint", ckpt, "--train", train, "--dev", dev, "task.text_column=sentence"],
                         [str(train), "'sentence'", "no such key"]),
        "label not in the list": (["--checkpoint", ckpt, "--train", train, "--dev", dev, 'task.labels=["no",maybe]'],
                                  [str(train), "'yes'", "label list"]),
        "bad key": (["--checkpoint", ckpt, "--train", train, "--dev", dev, "training.epoch=2"],
                    ["training.epoch", "training.epochs"]),
        "missing keys": (["--train", train], ["model.checkpoint: missing", "task.dev: missing"]),
    }
    for name, (args, expected) in cases.items():
        out = root / f"bad_{name.replace(' ', '_')}"
        flags = [a for a in args if "=" not in str(a)]
        assert finetune(*flags, "--out", out, *QUICK, *[a for a in args if a not in flags]) == 2, name
        err = capsys.readouterr().err
        assert all(e in err for e in expected), (name, err)
        if name not in ("bad key", "missing keys"):
            assert len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists(), name


# ---------------------------------------------------------------------------------------------
# Suites: several tasks, one table
# ---------------------------------------------------------------------------------------------
def test_suite_runs_every_task_and_writes_one_table(assets, capsys):
    root, _, ckpt, words = assets
    suite_root = root / "suite"
    suite_root.mkdir()
    train, dev = classification_files(suite_root, words, 64, 32)
    rows = [{"text": " ".join(w), "label": sum(bare(x) in NAMES for x in w)} for w in windows(words, 10)][:96]
    reg_train, reg_dev = (write_jsonl(suite_root / f"reg_{n}.jsonl", part) for n, part in (("train", rows[:64]),
                                                                                            ("dev", rows[64:])))
    (suite_root / "cls.yaml").write_text(f"task: {{train: {train}, dev: {dev}}}\nmodel: {{checkpoint: nowhere}}\n")
    (suite_root / "reg.yaml").write_text(f"task: {{type: regression, train: {reg_train}, dev: {reg_dev}}}\n")
    suite = suite_root / "tiny.yaml"
    suite.write_text("tasks:\n  - {name: cls, config: cls.yaml, overrides: ['training.seeds=[1,2]']}\n"
                     "  - {name: reg, config: reg.yaml}\n")
    out = root / "suite_out"
    assert finetune("--suite", suite, "--checkpoint", ckpt, "--out", out, *QUICK, "training.max_steps=3",
                    "checkpoint.best=false", "checkpoint.export_hf=false") == 0
    table = json.loads((out / "suite.json").read_text())
    assert list(table["tasks"]) == ["cls", "reg"]
    for name, metric, seeds in (("cls", "accuracy", {"1", "2"}), ("reg", "pearson_spearman_mean", {"42"})):
        own = json.loads((out / name / "metrics.json").read_text())     # each task's own run, under OUT/NAME
        row = table["tasks"][name]
        assert row["metric"] == own["metric"] == metric and set(row["seeds"]) == seeds
        assert (row["mean"], row["std"]) == (own["mean"][metric], own["std"][metric])
        assert row["seeds"] == {s: v[metric] for s, v in own["seeds"].items()}
    cls = table["tasks"]["cls"]
    assert cls["mean"] == pytest.approx(sum(cls["seeds"].values()) / 2)
    assert table["average"] == pytest.approx((cls["mean"] + table["tasks"]["reg"]["mean"]) / 2)
    md = (out / "suite.md").read_text().splitlines()
    assert md[0].startswith("| task | metric | mean ± std") and len(md) == 5
    assert md[2].startswith("| cls | accuracy | ") and md[3].startswith("| reg | pearson_spearman_mean | ")
    assert md[4].startswith("| average |") and f"{table['average']:.4f}" in md[4]
    assert "\n".join(md) in capsys.readouterr().out                  # the table is printed


def test_bad_suite_files_are_one_line_and_run_nothing(assets, capsys):
    root, _, ckpt, words = assets
    bad = root / "bad_suites"
    bad.mkdir()
    train, dev = classification_files(bad, words, 32, 16)
    (bad / "ok.yaml").write_text(f"task: {{train: {train}, dev: {dev}}}\n")
    cases = {
        "no tasks": ("runs: []\n", ["missing `tasks`"]),
        "no name": ("tasks:\n  - {config: ok.yaml}\n", ["tasks[0]", "missing `name`"]),
        "no config": ("tasks:\n  - {name: a}\n", ["tasks[0] (a)", "missing `config`"]),
        "duplicate": ("tasks:\n  - {name: a, config: ok.yaml}\n  - {name: a, config: ok.yaml}\n",
                      ["tasks[1] (a)", "duplicate name 'a'"]),
        "missing config": ("tasks:\n  - {name: a, config: ok.yaml}\n  - {name: b, config: nope.yaml}\n",
                           ["tasks[1] (b)", "nope.yaml", "does not exist"]),
    }
    for name, (text, expected) in cases.items():
        suite = bad / f"{name.replace(' ', '_')}.yaml"
        suite.write_text(text)
        out = bad / f"out_{name.replace(' ', '_')}"
        assert finetune("--suite", suite, "--checkpoint", ckpt, "--out", out, *QUICK) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(suite) in err, (name, err)
        assert all(e in err for e in expected), (name, err)
        assert not out.exists(), name


# ---------------------------------------------------------------------------------------------
# Data parallel: 2 ranks = 1 rank at the same global batch
# ---------------------------------------------------------------------------------------------
def launch(args: list, nproc: int, log_dir: Path, timeout: int = 240) -> list[int]:
    """`python -m pretrain finetune ARGS` on ``nproc`` local ranks; every rank must exit 0."""
    procs, logs = spawn_ranks(["finetune", *args], nproc, log_dir)
    codes = wait_all(procs, timeout)
    assert codes == [0] * nproc, "\n".join(f"--- rank {i}\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
    return codes


@pytest.mark.slow
def test_two_ranks_match_one_rank(assets):
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words, 160, 40)
    common = ["--checkpoint", ckpt, "--train", train, "--dev", dev, *QUICK, "training.micro_batch_size=8",
              "training.global_batch_size=16", "training.epochs=6", "eval.every_steps=5", "checkpoint.best=false",
              "checkpoint.export_hf=false"]
    assert finetune(*common, "--out", root / "dp1") == 0
    (root / "dp2").mkdir()
    launch([*common, "--out", root / "dp2"], 2, root / "dp2")
    one, two = (json.loads((root / d / "metrics.json").read_text())["seeds"]["42"] for d in ("dp1", "dp2"))
    assert one["accuracy"] >= 0.85                                 # it learnt: the comparison means something
    assert one["best_step"] == two["best_step"] and one["accuracy"] == two["accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    evals = [[r for r in read_jsonl(root / d / "seed-42" / "metrics.jsonl") if r["kind"] == "eval"]
             for d in ("dp1", "dp2")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]]
    for a, b in zip(*evals):
        assert b["dev/loss"] == pytest.approx(a["dev/loss"], rel=1e-4)
