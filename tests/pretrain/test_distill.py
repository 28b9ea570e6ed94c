"""Distillation (pretrain/distill.py, `python -m pretrain distill`).

In process: the loss equals a reference written from dense logits with torch's KLDivLoss,
CrossEntropyLoss, CosineEmbeddingLoss and MSELoss over the same positions; the student starts as the
mapped teacher layers; the teacher is frozen (no grads, bitwise unchanged by training, never a parameter of
the trained module); bad settings are one-line errors.  Through the real command (in this process, one rank,
ZeRO-1): a stopped run resumed with the transformers export of its teacher (the same weights, so the same
teacher) is the uninterrupted run, bitwise; another teacher is refused on resume, naming both; the distilbert
student exports to DistilBertForMaskedLM (transformers' logits equal ours) and fine-tunes.  On 2 CPU ranks
(gloo) with ZeRO-3, a BERT-shaped student trains and exports to BertForMaskedLM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.cli import main
from pretrain.config import Config, ConfigError, DistillConfig, ModelConfig, TrainingConfig
from pretrain.distill import Teacher, distill_config, frozen_teacher, layer_map, objective, prepare, weights_sha256
from pretrain.model import IGNORE_INDEX, build_model
from pretrain.weights import CheckpointError, load_weights, save_weights
from tests.finetune.conftest import own_signal_handlers  # noqa: F401  (autouse: a command run here installs its own)
from tests.finetune.test_train import finetune
from tests.pretrain.training_helpers import (DEMO_CORPUS, REPO, Launch, build_shards, data_overrides, spawn_ranks,
                                             wait_all)

T = 2.0


def teacher_of(m: ModelConfig, seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    weights = build_model(m).consolidated_state_dict()
    return Teacher(m, weights, {"sha256": weights_sha256(weights), "path": "memory"})


def small(**changes) -> ModelConfig:
    """A 4-layer teacher without dropout, vocabulary 97 (padded to 104 inside the model)."""
    return ModelConfig(**{**dict(vocab_size=97, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
                                 max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0), **changes})


def distiller(teacher: Teacher, precision: str = "fp32", **settings):
    cfg = Config(training=TrainingConfig(seq_len=16, max_predictions=4, precision=precision),
                 distill=DistillConfig(**settings))
    cfg = distill_config(cfg, teacher)
    return objective(cfg, teacher).wrap(build_model(cfg.model), torch.device("cpu")), cfg


def far_apart(model):
    """The student's weights perturbed and the teacher's logits sharpened: a student fresh from its teacher's
    layers (at BERT's init scale) has nearly its hidden states and distributions, where the direction of the KL
    and the positions a mean runs over hardly show."""
    with torch.no_grad():
        model.teacher.mlm_head.decoder_bias.normal_(0, 3, generator=torch.Generator().manual_seed(1))
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model


def batch() -> dict:
    """Three rows of 16 slots (12, 9 and 5 real tokens), 4 masked-position entries a row, the last entries of
    the short rows padding (label -100), segment ids 0/1."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([12, 9, 5])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    positions = torch.tensor([[1, 4, 7, 10], [2, 3, 8, 0], [1, 3, 0, 0]])
    labels = torch.randint(5, 97, (3, 4), generator=gen)
    labels[1, 3] = labels[2, 2] = labels[2, 3] = IGNORE_INDEX
    return {"input_ids": torch.randint(5, 97, (3, 16), generator=gen) * mask, "attention_mask": mask,
            "token_type_ids": (torch.arange(16)[None] >= 6).long() * mask,
            "masked_lm_positions": positions, "masked_lm_labels": labels,
            "sentence_labels": torch.tensor([0, 1, 0])}


# ---------------------------------------------------------------------------------------------
# The loss, the student, the frozen teacher
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("student", ["distilbert", "teacher"])
def test_loss_equals_the_dense_reference(student):
    model = far_apart(distiller(teacher_of(small()), student=student, alpha_mse=0.5)[0])
    b = batch()
    out = model.train()(**b)

    # Independently: logits at every position (the dense head), then the masked rows picked by the labels.
    inputs = {k: b[k] for k in ("attention_mask", "token_type_ids")}
    hidden = model.student.encode(b["input_ids"], **inputs)
    teacher_hidden = model.teacher.encode(b["input_ids"], **inputs)
    dense, teacher_dense = model.student.mlm_logits(hidden), model.teacher.mlm_logits(teacher_hidden)
    rows = (b["masked_lm_positions"] + 16 * torch.arange(3)[:, None]).reshape(-1)
    labels = b["masked_lm_labels"].reshape(-1)
    rows, labels = rows[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX]
    s, t = dense[rows], teacher_dense[rows]
    ce = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T ** 2
    mlm = nn.CrossEntropyLoss()(s, labels)
    real = b["attention_mask"].bool()
    cos = nn.CosineEmbeddingLoss()(hidden[real], teacher_hidden[real], torch.ones(int(real.sum())))
    mse = nn.MSELoss()(hidden[real], teacher_hidden[real])

    got = out.components
    assert sorted(got) == ["ce", "cos", "mlm", "mse"]
    for name, want in (("ce", ce), ("mlm", mlm), ("cos", cos), ("mse", mse)):
        assert abs(got[name].item() - want.item()) < 1e-6, (name, got[name].item(), want.item())
    assert abs(out.loss.item() - (5 * ce + 2 * mlm + cos + 0.5 * mse).item()) < 1e-5
    assert out.mlm_count.item() == len(labels) and ce.item() > 0.5 and cos.item() > 0.05, (ce, cos)
    # Held-out evaluation is the student alone: its MLM loss, no components.
    assert abs(model.eval()(**b).mlm_loss.item() - mlm.item()) < 1e-6


def test_packed_rows_give_the_padded_batch_losses():
    """data.packing: the same instances packed into shared rows (attention within each) give the same losses."""
    import numpy as np
    from pretrain.bench.batches import make_batches
    model = far_apart(distiller(teacher_of(small()), student="teacher", alpha_mse=0.5)[0])
    batches = make_batches(32, 6, 97, count=1, packed=True, max_predictions=4, lengths=np.array([6, 9, 12]))
    assert batches.packed[0]["input_ids"].size(0) < 6
    padded, packed = model.train()(**batches.padded[0]), model(**batches.packed[0])
    assert sorted(packed.components) == ["ce", "cos", "mlm", "mse"]
    for name, value in padded.components.items():
        assert abs(packed.components[name].item() - value.item()) < 1e-5, name


def test_student_starts_as_the_mapped_teacher_layers():
    teacher = teacher_of(small())
    weights = dict(teacher.state_dict)
    model, cfg = distiller(teacher, layer_map=[3, 0, 2])
    assert teacher.state_dict is None                   # the fp32 host copy is let go once the frozen one exists
    assert (cfg.model.arch, cfg.model.num_layers, cfg.model.sentence_head) == ("distilbert", 3, "none")
    ours = model.consolidated_state_dict()
    for key, value in ours.items():
        source = key
        for i, j in enumerate([3, 0, 2]):
            source = source.replace(f"encoder.layers.{i}.", f"encoder.layers.{j}.") if key.startswith(
                f"encoder.layers.{i}.") else source
        assert torch.equal(value, weights[source]), key
    assert "embeddings.token_type.weight" not in ours and not any(k.startswith(("pooler", "sentence")) for k in ours)
    assert set(model.state_dict()) == set(model.student.state_dict())    # checkpoints are the student's
    assert layer_map(small(), DistillConfig()) == [0, 2]
    assert layer_map(small(num_layers=5), DistillConfig()) == [0, 2, 4]


def test_teacher_is_frozen_and_unchanged_by_training():
    teacher = teacher_of(small())
    model, _ = distiller(teacher)
    frozen = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_params = {id(p) for p in model.parameters()}
    assert not student_params & {id(p) for p in model.teacher.parameters()}
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch()).loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training     # model.train() reaches the student's modules only
    assert all(torch.equal(v, frozen[k]) for k, v in model.teacher.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_teacher_runs_in_the_training_precision():
    teacher = teacher_of(small())
    cfg = Config(training=TrainingConfig(precision="bf16"))
    assert {p.dtype for p in frozen_teacher(teacher, cfg, torch.device("cpu")).parameters()} == {torch.bfloat16}


def test_bad_settings_are_one_line_errors(tmp_path):
    from pretrain.config import load_config
    with pytest.raises(ConfigError, match=r"distill.layer_map: got \[\], expected a non-empty list"):
        load_config(None, ["distill.layer_map=[]"])
    with pytest.raises(ConfigError, match="distill.alpha_ce, alpha_mlm, alpha_cos, alpha_mse: all are 0"):
        load_config(None, ["distill.alpha_ce=0", "distill.alpha_mlm=0", "distill.alpha_cos=0"])
    with pytest.raises(ConfigError, match=r"distill.layer_map: teacher layer\(s\) \[9\] do not exist: the teacher "
                                          r"has 4 layers"):
        distiller(teacher_of(small()), layer_map=[0, 9])
    with pytest.raises(ConfigError, match="distill.student=distilbert needs a post-LN BERT teacher"):
        distiller(teacher_of(small(layer_norm_position="pre")))
    with pytest.raises(ConfigError, match="distill.teacher: missing"):
        prepare(Config())
    with pytest.raises(CheckpointError, match=f"distill.teacher: .*{tmp_path / 'nothing'}"):
        prepare(Config(distill=DistillConfig(teacher=str(tmp_path / "nothing"))))
    with pytest.raises(ConfigError, match="with the student derived from distill.teacher: training.seq_len"):
        distill_config(Config(training=TrainingConfig(seq_len=64)), teacher_of(small()))


# ---------------------------------------------------------------------------------------------
# Through `python -m pretrain distill`
# ---------------------------------------------------------------------------------------------
QUICK = ["training.micro_batch_size=8", "training.global_batch_size=16", "training.precision=fp32",
         "training.max_steps=4", "schedule.warmup_steps=1", "logging.every_steps=1", "logging.progress_bar=false",
         "logging.tensorboard=false", "checkpoint.every_steps=1000", "data.num_workers=0", "eval.every_steps=2",
         "eval.max_batches=1"]


def distill(run_dir: Path, overrides: list, *extra_args: str) -> int:
    """`python -m pretrain distill` in this process, as one rank, the environment restored after."""
    saved = dict(os.environ)
    try:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
        os.environ["DS_ACCELERATOR"] = "cpu"
        return main(["distill", "--config", str(REPO / "configs/debug.yaml"), f"logging.run_dir={run_dir}",
                     *map(str, overrides), *extra_args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def save_teacher(path: Path, data: Path, seed: int, tokenizer: str | None = None) -> Path:
    """A randomly initialised 4-layer BERT (vocabulary of the shards) saved as our checkpoint, recording the
    shards' tokenizer (or ``tokenizer``) as a training run does."""
    from data_prep.vocab import load_tokenizer_dir
    from pretrain.config import load_config
    cfg = load_config(str(REPO / "configs/debug.yaml"), [
        "model.vocab_size=2048", "model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
        "model.intermediate_size=64", *data_overrides(data)])
    torch.manual_seed(seed)
    tokenizer = tokenizer or load_tokenizer_dir(data / "tokenizer")[1].sha256
    save_weights(str(path), cfg, build_model(cfg.model).consolidated_state_dict(),
                 {"tokenizer_dir": str(data / "tokenizer"), "fingerprints": {"tokenizer": tokenizer}})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = build_shards(root / "data", "dynamic")
    teacher = save_teacher(root / "teacher", data, 0)
    return root, data, teacher, save_teacher(root / "other", data, 1), QUICK + data_overrides(data) + [
        f"distill.teacher={teacher}"]


@pytest.fixture(scope="module")
def straight(setup):
    """The run dir of a distilbert student distilled for 4 steps (ZeRO-1, one rank)."""
    root, *_, overrides = setup
    assert distill(root / "straight", overrides) == 0
    return root / "straight"


def hf_parity(ckpt: Path, hf_dir: Path, architecture: str) -> None:
    """transformers' logits of the export equal our model's at the real tokens of a padded batch (1e-5)."""
    import transformers
    from pretrain.weights import load_model
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [architecture]
    hf = getattr(transformers, architecture).from_pretrained(hf_dir).eval()
    ours, _, _ = load_model(str(ckpt))
    ids = torch.randint(5, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours.mlm_logits(ours.encode(ids, mask)).view(2, 24, -1)
    real = mask.bool()
    assert (theirs[real] - mine[real]).abs().max().item() < 1e-5


@pytest.mark.slow
def test_resume_is_exact_each_component_logged_and_another_teacher_refused(setup, straight, capsys):
    """Stopped at step 2 with the teacher's checkpoint, resumed with its transformers export (the same weights:
    the same teacher), the run is the uninterrupted one; resumed with another teacher it is refused."""
    from pretrain.hf import export_checkpoint
    root, _, teacher, other, overrides = setup
    assert distill(root / "resumed", overrides, "--stop-after-step", "2") == 75
    export_checkpoint(str(teacher), str(root / "teacher-hf"))
    assert distill(root / "resumed", overrides + [f"distill.teacher={root / 'teacher-hf'}"]) == 0
    assert "resumed from step-000002 at step 2" in capsys.readouterr().out
    losses = {r["step"]: r["train/loss"] for r in metrics(straight)}
    assert {r["step"]: r["train/loss"] for r in metrics(root / "resumed")} == losses and sorted(losses) == [1, 2, 3, 4]
    for row in metrics(straight):
        weighted = 5 * row["train/loss_ce"] + 2 * row["train/loss_mlm"] + row["train/loss_cos"]
        assert row["train/loss"] == pytest.approx(weighted, rel=1e-5)
        assert row["train/loss_mlm"] == pytest.approx(row["train/mlm_loss"], rel=1e-6)
    assert [r["step"] for r in metrics(straight, "eval")] == [0, 2, 4]

    assert distill(straight, overrides + [f"distill.teacher={other}"]) == 2
    err = capsys.readouterr().err
    assert f"teacher: checkpoint {teacher} (sha256" in err and f"this run {other} (sha256" in err, err


@pytest.mark.slow
def test_a_teacher_of_another_tokenizer_is_refused(setup, tmp_path, capsys):
    """Ours by the tokenizer hash its checkpoint records; a transformers directory by its own tokenizer files'
    ids (here its vocab.txt with two tokens swapped), whether or not data.tokenizer is given."""
    from pretrain.hf import export_checkpoint
    root, data, teacher, _, overrides = setup
    other = save_teacher(tmp_path / "teacher", data, 0, tokenizer="0" * 64)
    assert distill(tmp_path / "ours", overrides + [f"distill.teacher={other}", "data.tokenizer=null"]) == 2
    err = capsys.readouterr().err
    assert f"distill.teacher: {other} was trained with tokenizer 0000" in err and "but the shards' tokenizer is" in err
    hf = tmp_path / "hf"
    export_checkpoint(str(teacher), str(hf))
    (hf / "tokenizer.json").unlink()
    tokens = (hf / "vocab.txt").read_text().splitlines()
    tokens[10], tokens[11] = tokens[11], tokens[10]
    (hf / "vocab.txt").write_text("\n".join(tokens) + "\n")
    assert distill(tmp_path / "hf-run", overrides + [f"distill.teacher={hf}"]) == 2
    err = capsys.readouterr().err
    assert f"distill.teacher: {hf}: its tokenizer gives 2 of the shards' " in err and "other ids" in err, err


@pytest.mark.slow
def test_distilbert_student_exports_and_fine_tunes(straight, tmp_path):
    from pretrain.finetune.demo_task import mention_rows, read_words
    from pretrain.hf import export_checkpoint
    ckpt = straight / "checkpoints" / "step-000004"
    export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    hf_parity(ckpt, tmp_path / "hf", "DistilBertForMaskedLM")
    rows = mention_rows(read_words(str(DEMO_CORPUS)), "emma", 64)
    for name, part in (("train", rows[:48]), ("dev", rows[48:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert finetune("--checkpoint", ckpt, "--train", tmp_path / "train.jsonl", "--dev", tmp_path / "dev.jsonl",
                    "--out", tmp_path / "ft", "training.epochs=1", "training.micro_batch_size=16",
                    "training.global_batch_size=16", "training.precision=fp32", "logging.progress_bar=false",
                    "logging.tensorboard=false") == 0
    assert "accuracy" in json.loads((tmp_path / "ft" / "metrics.json").read_text())["mean"]


@pytest.mark.slow
def test_two_ranks_zero3_distil_a_bert_shaped_student(setup, tmp_path):
    from pretrain.hf import export_checkpoint
    root, data, teacher, _, overrides = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    procs, logs = spawn_ranks(["distill", "--config", REPO / "configs/debug.yaml", f"logging.run_dir={run_dir}",
                               *overrides, "distill.student=teacher", "zero.stage=3", "training.max_steps=2"],
                              2, run_dir)
    run = Launch(wait_all(procs, 300), [p.read_text() for p in logs], run_dir)
    assert run.codes == [0, 0], run.explain()
    assert [r["step"] for r in metrics(run_dir, "eval")] == [0, 2]
    ckpt = run_dir / "checkpoints" / "step-000002"
    prints = json.loads((ckpt / "fingerprints.json").read_text())
    assert prints["teacher"]["sha256"] == weights_sha256(load_weights(str(teacher))[1])
    config, weights, _ = load_weights(str(ckpt))
    assert (config.model.arch, config.model.num_layers, config.model.sentence_head) == ("bert", 2, "none")
    assert "embeddings.token_type.weight" in weights
    export_checkpoint(str(ckpt), str(tmp_path / "student-hf"))
    hf_parity(ckpt, tmp_path / "student-hf", "BertForMaskedLM")
