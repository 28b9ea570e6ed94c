"""`python -m pretrain finetune` continues after it is stopped: the same command again gives what an
uninterrupted run gives, exactly (CPU, fp32: the same operations in the same order, so tolerance 0).

Checked: a run stopped by a stop signal after step k (in process: a stand-in for pretrain.signals.StopSignal
whose SIGTERM arrives at a chosen step) exits 75 with a checkpoint, and the rerun gives the same logged
losses, evaluations, predictions, metrics.json and export as an uninterrupted run (ZeRO-0, the default,
ZeRO-1 and ZeRO-3's partitioned parameters); stopped in the second seed, the rerun reads the first seed's result back
instead of training it again; a real SIGTERM to a `python -m pretrain finetune` subprocess exits 75 with a
checkpoint the rerun continues from; a process that dies during a checkpoint save leaves the previous
checkpoint, and the rerun continues from it; a rerun with another config into the run directory is refused
in one line naming the keys, one that changes only logging is not.  Head dropout is on, so the RNG state
matters.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import pretrain.signals
from pretrain.engine import shutdown_distributed
from pretrain.faults import Faults
from tests.finetune.test_train import QUICK, assets, classification_files, finetune, read_jsonl  # noqa: F401
from tests.pretrain.training_helpers import spawn_ranks, wait_all

# 64 training examples in batches of 16: 4 steps an epoch, 12 in all; dev evaluations at steps 3, 4, 6, 8, 9,
# 12; a log line every 2 steps, so a stop at an odd step leaves a half-full loss window to carry over.
RESUMABLE = [*QUICK, "model.head_dropout=0.1", "training.epochs=3", "eval.every_steps=3", "logging.every_steps=2",
             "training.seeds=[1,2]"]
STEPS = 12


class StopAtStep:
    """pretrain.signals.StopSignal's stand-in: SIGTERM 'arrives' during the n-th optimizer step of the
    process, counted over the seeds (the engine reads ``received`` once a step)."""
    announce = True

    def __init__(self, n: int):
        self.left = n

    @property
    def received(self):
        self.left -= 1
        return signal.SIGTERM if self.left <= 0 else None


class Killed(BaseException):
    """The process 'dies' here (what kill -9 would leave on disk: nothing after this point is written)."""


@pytest.fixture(scope="module")
def task(assets):
    root, _, ckpt, words = assets
    (root / "resume").mkdir(exist_ok=True)
    train, dev = classification_files(root / "resume", words, 64, 32)
    return root / "resume", ["--checkpoint", ckpt, "--train", train, "--dev", dev]


@pytest.fixture(scope="module")
def straight(task):
    """An uninterrupted run of two seeds."""
    root, files = task
    assert finetune(*files, "--out", root / "straight", *RESUMABLE) == 0
    return root / "straight"


def outputs(run_dir: Path) -> dict:
    """What a run leaves that must not depend on its interruptions: metrics.json, and per seed its logged rows
    (without their time; the ``run`` rows, one a start, say where each start began), its predictions and its
    transformers export."""
    out = {"metrics.json": json.loads((run_dir / "metrics.json").read_text())}
    for seed_dir in sorted(run_dir.glob("seed-*")):
        rows = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(seed_dir / "metrics.jsonl")
                if r["kind"] != "run"]
        out[seed_dir.name] = {"rows": rows, "predictions": (seed_dir / "predictions.jsonl").read_text(),
                              "hf": (seed_dir / "hf" / "model.safetensors").read_bytes()}
    return out


def stopped_at(monkeypatch, n: int, *args) -> int:
    """`python -m pretrain finetune ARGS` in process, SIGTERM arriving during its n-th step."""
    with monkeypatch.context() as patch:
        patch.setattr(pretrain.signals, "StopSignal", lambda: StopAtStep(n))
        return finetune(*args)


def test_a_run_stopped_after_a_step_resumes_exactly(task, straight, monkeypatch, capsys):
    root, files = task
    out = root / "stopped_in_seed_1"
    assert stopped_at(monkeypatch, 5, *files, "--out", out, *RESUMABLE) == 75
    printed = capsys.readouterr().out
    assert "seed 1: SIGTERM received: checkpoint saved at step 5; exiting with 75" in printed
    assert (out / "seed-1" / "checkpoints" / "latest").read_text().strip() == "step-000005"
    assert not (out / "seed-2").exists() and not (out / "metrics.json").exists()
    assert finetune(*files, "--out", out, *RESUMABLE) == 0
    assert f"seed 1: resumed from {out / 'seed-1' / 'checkpoints' / 'step-000005'} at step 5" in capsys.readouterr().out
    assert outputs(out) == outputs(straight)
    assert not (out / "seed-1" / "checkpoints").exists()          # a seed done keeps no checkpoint


def test_zero_3_partitions_resume_exactly_and_a_stop_at_the_last_step_too(task, monkeypatch):
    """The second stop comes at the last step, after the last evaluation: the rerun trains nothing and
    exports the best model from SEED_DIR/best."""
    root, files = task
    zero3 = [*RESUMABLE, "training.seeds=[1]", "zero.stage=3"]
    assert finetune(*files, "--out", root / "zero3_straight", *zero3) == 0
    out = root / "zero3"
    assert stopped_at(monkeypatch, 7, *files, "--out", out, *zero3) == 75
    assert stopped_at(monkeypatch, STEPS - 7, *files, "--out", out, *zero3) == 75
    assert (out / "seed-1" / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert finetune(*files, "--out", out, *zero3) == 0
    assert outputs(out) == outputs(root / "zero3_straight")


def test_zero_1_resumes_exactly_and_a_rerun_at_another_stage_is_refused(task, straight, monkeypatch, capsys):
    """DeepSpeed's files differ by stage: a seed checkpointed at ZeRO-1 and resumed at stage 0 would lose
    its optimizer state silently (DeepSpeed falls back to the weights alone), so it is refused."""
    root, files = task
    out, zero1 = root / "zero1", [*RESUMABLE, "zero.stage=1"]
    assert stopped_at(monkeypatch, 5, *files, "--out", out, *zero1) == 75
    capsys.readouterr()
    assert finetune(*files, "--out", out, *RESUMABLE) == 2
    assert "was saved with ZeRO stage 1 and this run has 0" in capsys.readouterr().err
    assert finetune(*files, "--out", out, *zero1) == 0
    assert outputs(out) == outputs(straight)      # fp32: ZeRO-1 steps as stage 0 does, to the bit


def test_stopped_in_the_second_seed_the_first_is_not_trained_again(task, straight, monkeypatch, capsys):
    root, files = task
    out = root / "stopped_in_seed_2"
    assert stopped_at(monkeypatch, STEPS + 3, *files, "--out", out, *RESUMABLE) == 75
    assert "seed 2: SIGTERM received: checkpoint saved at step 3" in capsys.readouterr().out
    first = {p: p.stat().st_mtime_ns for p in (out / "seed-1").rglob("*") if p.is_file()}
    assert finetune(*files, "--out", out, *RESUMABLE) == 0
    printed = capsys.readouterr().out
    assert f"seed 1: done in an earlier run ({out / 'seed-1' / 'result.json'}): not trained again" in printed
    assert "seed 2: resumed from" in printed and "seed 1: resumed" not in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "seed-1").rglob("*") if p.is_file()} == first
    assert outputs(out) == outputs(straight)


def test_a_death_during_a_checkpoint_save_leaves_the_previous_one(task, straight, monkeypatch, capsys):
    root, files = task
    out = root / "killed_in_a_save"

    def during_save(self, step):
        if step == 4:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Faults, "during_save", during_save)
        with pytest.raises(Killed):
            finetune(*files, "--out", out, *RESUMABLE, "checkpoint.every_steps=2")
    shutdown_distributed()          # the dead process's group, left behind in this one
    ckpts = out / "seed-1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002" and (ckpts / ".tmp-step-000004").is_dir()
    capsys.readouterr()
    assert finetune(*files, "--out", out, *RESUMABLE, "checkpoint.every_steps=2") == 0
    assert f"seed 1: resumed from {ckpts / 'step-000002'} at step 2" in capsys.readouterr().out
    assert outputs(out) == outputs(straight)


def test_sigterm_to_the_command_exits_75_with_a_checkpoint_it_resumes_from(task, capsys):
    root, files = task
    out = root / "sigterm"
    args = [*files, "--out", out, *QUICK, "model.head_dropout=0.1", "training.max_steps=40", "eval.every_steps=10",
            "logging.every_steps=1"]
    out.mkdir()
    procs, logs = spawn_ranks(["finetune", *args], 1, out)
    metrics, deadline = out / "seed-42" / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, 120) == [75], logs[0].read_text()[-3000:]
    log = logs[0].read_text()
    stopped = int((out / "seed-42" / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= stopped < 40
    assert f"seed 42: SIGTERM received: checkpoint saved at step {stopped}; exiting with 75" in log
    assert "Traceback" not in log
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as in the subprocess (spawn_ranks: OMP_NUM_THREADS=1): the same floats
    try:
        assert finetune(*args) == 0
        assert f"resumed from {out / 'seed-42' / 'checkpoints' / f'step-{stopped:06d}'}" in capsys.readouterr().out
        assert finetune(*[a if a != out else root / "sigterm_straight" for a in args]) == 0
    finally:
        torch.set_num_threads(threads)
    assert outputs(out) == outputs(root / "sigterm_straight")


def test_a_rerun_with_another_config_is_refused_in_one_line(task, capsys):
    root, files = task
    out = root / "changed"
    short = [*QUICK, "training.max_steps=2", "checkpoint.export_hf=false"]
    assert finetune(*files, "--out", out, *short) == 0
    capsys.readouterr()
    assert finetune(*files, "--out", out, *short, "optimizer.lr=1e-3", "training.max_steps=3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {out} holds a run of another config (")
    assert "optimizer.lr: 0.002 there, 0.001 now; training.max_steps: 2 there, 3 now" in err
    changed = root / "changed_train.jsonl"
    text = Path(files[3]).read_text()
    changed.write_text(text + text.splitlines()[0] + "\n")         # one example more
    assert finetune(*files[:3], changed, *files[4:], "--out", out, *short) == 2
    assert "task.train: another file's contents" in capsys.readouterr().err
    # Logging is not part of the run: the rerun reads the seed back.
    assert finetune(*files, "--out", out, *short, "logging.every_steps=1", "logging.progress_bar=true") == 0
    assert "seed 42: done in an earlier run" in capsys.readouterr().out
    assert os.path.isfile(out / "metrics.json")
