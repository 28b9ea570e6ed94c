"""Pretraining for real: 2-rank CPU runs (gloo) through `python -m pretrain train`.

ZeRO 0-3 reduce the loss; resume is exact (bitwise on CPU fp32) with static and dynamic
masking; a signal checkpoints and exits 75; a crash in the middle of a checkpoint save leaves the
previous one loadable; TensorBoard event files read back with tensorboard's own reader; a golden
run reproduces recorded losses.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.pretrain.training_helpers import (REPO, TINY, build_shards, data_overrides, launch, spawn,
                                             wait_for_logged_steps)

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).with_name("golden_losses.json")


@pytest.fixture(scope="module")
def dynamic_data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("dyn"), "dynamic")


@pytest.fixture(scope="module")
def static_data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("sta"), "static")


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_two_ranks_each_zero_stage_reduce_the_loss(dynamic_data, tmp_path, stage, precision):
    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        f"zero.stage={stage}", f"training.precision={precision}", "training.max_steps=16", "optimizer.lr=0.02",
        "schedule.warmup_steps=2"])
    assert run.codes == [0, 0], run.explain()
    losses = [r["train/mlm_loss"] for r in run.metrics()]
    assert len(losses) == 16
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.15, f"ZeRO-{stage}: MLM loss did not go down: {losses}"
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step-000016"


def _resume_matches(data: Path, tmp_path: Path, extra: list[str]) -> None:
    overrides = TINY + data_overrides(data) + ["training.max_steps=8", "schedule.warmup_steps=2",
                                               "data.num_workers=1"] + extra
    straight = launch(tmp_path / "straight", overrides)
    assert straight.codes == [0, 0], straight.explain()
    halted = launch(tmp_path / "resumed", overrides, extra_args=["--stop-after-step", "4"])
    assert halted.codes == [75, 75], halted.explain()
    assert max(halted.losses()) == 4
    resumed = launch(tmp_path / "resumed", overrides)
    assert resumed.codes == [0, 0], resumed.explain()
    assert "resumed from step-000004 at step 4" in resumed.logs[0]
    expected, got = straight.losses(), resumed.losses()
    assert sorted(got) == list(range(1, 9))
    assert got == expected, "resume is not exact:\n" + "\n".join(
        f"step {s}: straight {expected[s]!r} resumed {got[s]!r}" for s in expected if expected[s] != got.get(s))


def test_exact_resume_dynamic_masking_zero2(dynamic_data, tmp_path):
    _resume_matches(dynamic_data, tmp_path, ["zero.stage=2"])


def test_exact_resume_static_masking_zero1(static_data, tmp_path):
    _resume_matches(static_data, tmp_path, ["zero.stage=1"])


def test_resume_with_another_world_size_continues_the_same_trajectory(dynamic_data, tmp_path):
    """2 ranks -> 1 rank (ZeRO-2 optimizer partitions re-split through DeepSpeed's universal format).
    Dropout off, so the only difference from a straight 2-rank run is the summation order."""
    overrides = TINY + data_overrides(dynamic_data) + ["training.max_steps=6", "zero.stage=2",
                                                       "model.hidden_dropout=0", "model.attention_dropout=0"]
    straight = launch(tmp_path / "straight", overrides)
    assert straight.codes == [0, 0], straight.explain()
    first = launch(tmp_path / "run", overrides, extra_args=["--stop-after-step", "3"])
    assert first.codes == [75, 75], first.explain()
    second = launch(tmp_path / "run", overrides, nproc=1)
    assert second.codes == [0], second.explain()
    assert "world size changed 2 -> 1" in second.logs[0]
    assert "continues at global sample 48" in second.logs[0]
    resumed = second.losses()
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight.losses()[step], rel=1e-5), step


def test_signal_checkpoints_exits_75_and_resume_finishes(dynamic_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = TINY + data_overrides(dynamic_data) + ["training.max_steps=400", "zero.stage=2"]
    procs, _ = spawn(run_dir, overrides)
    wait_for_logged_steps(run_dir, 3)
    for p in procs:              # SLURM's --signal delivers to every task
        p.send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [75, 75]
    saved_step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= saved_step < 400
    finish = launch(run_dir, [o for o in overrides if not o.startswith("training.max_steps")] +
                    [f"training.max_steps={saved_step + 3}", "checkpoint.allow_fingerprint_mismatch=true"])
    assert finish.codes == [0, 0], finish.explain()
    assert f"resumed from step-{saved_step:06d}" in finish.logs[0]


def test_crash_during_checkpoint_save_leaves_previous_checkpoint_loadable(dynamic_data, tmp_path):
    overrides = TINY + data_overrides(dynamic_data) + ["training.max_steps=6", "checkpoint.every_steps=2",
                                                       "zero.stage=2"]
    crashed = launch(tmp_path / "run", overrides, extra_args=["--fault", "kill-during-save@4"])
    assert crashed.codes[0] == 137, crashed.explain()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert (ckpts / ".tmp-step-000004").is_dir()          # the half-written save, never pointed at
    resumed = launch(tmp_path / "run", overrides)
    assert resumed.codes == [0, 0], resumed.explain()
    assert "resumed from step-000002 at step 2" in resumed.logs[0]
    assert not (ckpts / ".tmp-step-000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step-000006"


def test_tensorboard_events_read_back_with_tensorboards_reader(dynamic_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        "training.max_steps=4", "eval.every_steps=2", "eval.max_batches=2"], nproc=1)
    assert run.codes == [0], run.explain()
    acc = EventAccumulator(str(run.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/mlm_loss", "train/sentence_loss", "train/mlm_accuracy",
                "train/sentence_accuracy", "train/lr", "train/grad_norm", "perf/seq_per_s", "perf/tokens_per_s",
                "perf/tflops", "perf/step_time_s", "perf/loader_wait_s", "eval/mlm_accuracy",
                "eval/sentence_accuracy", "eval/perplexity"):
        assert tag in tags, f"{tag} missing from TensorBoard; have {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/mlm_accuracy")] == [0, 2, 4]
    assert (run.run_dir / "curves.png").stat().st_size > 10_000
    run_row = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[0])   # the run's metadata
    assert run_row["kind"] == "run" and run_row["step"] == 0 and run_row["world_size"] == 1
    assert run_row["config"]["training"]["max_steps"] == 4 and run_row["config"]["model"]["hidden_size"] == 32
    import importlib.metadata
    assert run_row["versions"]["torch"] == importlib.metadata.version("torch")
    assert run_row["git"]            # the tests run in a checkout
    assert {"run/config/text_summary", "run/metadata/text_summary"} <= set(acc.Tags()["tensors"])
    from pretrain.metrics import read_jsonl, run_title      # curves.png's title: the run and its model
    params = sum(p.numel() for p in torch.load(run.run_dir / "checkpoints" / "step-000004" / "model.pt").values())
    assert run_title(str(run.run_dir), read_jsonl(str(run.run_dir / "metrics.jsonl"))) == \
        f"run: bert, 2 layers x 32, {params / 1e6:.2f} M parameters"
    # stdout is a file here, as under SLURM: one plain line a logging window, no carriage returns
    lines = [line for line in run.logs[0].splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"] and "\r" not in run.logs[0]
    first = acc.Scalars("train/loss")[0].value
    assert f"loss {first:.4f}" in lines[0] and " seq/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[3]


def test_golden_losses(dynamic_data, tmp_path):
    """Debug config, fixed seed, 6 steps on one rank: the losses recorded in golden_losses.json.

    Regenerate (after an intended numerical change only) with BERTFORGE_REGEN_GOLDEN=1."""
    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        "training.max_steps=6", "zero.stage=0", "schedule.warmup_steps=2"], nproc=1)
    assert run.codes == [0], run.explain()
    losses = [run.losses()[s] for s in range(1, 7)]
    if os.environ.get("BERTFORGE_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(expected, rel=1e-5, abs=0)


def test_phase2_starts_from_phase1_weights_and_optimizer_state(dynamic_data, tmp_path):
    base = TINY + data_overrides(dynamic_data) + ["zero.stage=1", "optimizer.lr=0.02", "schedule.warmup_steps=1"]
    phase1 = launch(tmp_path / "p1", base + ["training.max_steps=12"], nproc=1)
    assert phase1.codes == [0], phase1.explain()
    phase2 = launch(tmp_path / "p2", base + ["training.max_steps=3", "training.global_batch_size=32",
                                             f"checkpoint.init_from={tmp_path / 'p1' / 'checkpoints'}",
                                             "checkpoint.init_optimizer=true"], nproc=1)
    assert phase2.codes == [0], phase2.explain()
    assert "weights and optimizer state; step, data position and schedule start afresh" in phase2.logs[0]
    fresh_first = launch(tmp_path / "fresh", base + ["training.max_steps=3"], nproc=1).metrics()[0]
    p2_first = phase2.metrics()[0]
    assert p2_first["train/mlm_loss"] < fresh_first["train/mlm_loss"] - 0.3
    assert sorted(phase2.losses()) == [1, 2, 3]


def test_non_finite_losses_are_skipped_counted_and_bounded(dynamic_data, tmp_path):
    base = TINY + data_overrides(dynamic_data) + ["zero.stage=2", "training.max_nonfinite_steps=3"]
    skipped = launch(tmp_path / "skip", base + ["training.max_steps=6"], extra_args=["--fault", "nan-loss@3-4"])
    assert skipped.codes == [0, 0], skipped.explain()
    assert "step 3: non-finite loss, update skipped (1 in a row, 1 in all)" in skipped.logs[0]
    assert "step 4: non-finite loss, update skipped (2 in a row, 2 in all)" in skipped.logs[0]
    records = {r["step"]: r for r in skipped.metrics()}
    assert records[6]["train/skipped_steps"] == 2
    assert all(math.isfinite(r["train/loss"]) for s, r in records.items() if s not in (3, 4))
    stopped = launch(tmp_path / "stop", base + ["training.max_steps=10"], extra_args=["--fault", "nan-loss@2-10"])
    assert stopped.codes == [1, 1], stopped.explain()
    assert "3 consecutive steps with a non-finite loss (training.max_nonfinite_steps=3) at step 4" in stopped.logs[0]


def test_what_would_fail_at_the_end_is_refused_at_the_start(dynamic_data, tmp_path):
    """model.arch=roberta on WordPiece shards (export needs <pad> at id 1), and a distillation config given to
    `pretrain train` (which would train the config's model section from scratch): exit 2, one line, nothing run."""
    base = TINY + data_overrides(dynamic_data) + ["training.max_steps=2"]
    roberta = launch(tmp_path / "roberta", base + ["model.arch=roberta", "model.sentence_head=none",
                                                   "model.max_position_embeddings=130"], nproc=1)
    assert roberta.codes == [2], roberta.explain()
    assert ("the shards' tokenizer pads with id 0, but model.arch=roberta needs RoBERTa's <pad> at id 1 (a "
            "vocabulary from `python -m data_prep vocab --model bpe`)") in roberta.logs[0]
    distill = launch(tmp_path / "distill", base + [f"distill.teacher={tmp_path}"], nproc=1)
    assert distill.codes == [2], distill.explain()
    assert (f"error: distill.teacher is set ({tmp_path}): this is a distillation config, which `python -m pretrain "
            f"train` would not distill; run `python -m pretrain distill` with it") in distill.logs[0]
    assert not any((tmp_path / run / "checkpoints").exists() for run in ("roberta", "distill"))


def test_changed_run_definition_is_refused_on_resume_unless_allowed(dynamic_data, tmp_path):
    base = TINY + data_overrides(dynamic_data) + ["zero.stage=0"]
    first = launch(tmp_path / "run", base + ["training.max_steps=4"], nproc=1, extra_args=["--stop-after-step", "2"])
    assert first.codes == [75], first.explain()
    changed = launch(tmp_path / "run", base + ["training.max_steps=4", "optimizer.lr=0.5"], nproc=1)
    assert changed.codes == [2], changed.explain()
    assert "cannot resume from" in changed.logs[0]
    assert "config: optimizer.lr: 0.005 there, 0.5 now" in changed.logs[0]     # the setting, not two hashes
    assert "checkpoint.allow_fingerprint_mismatch=true" in changed.logs[0]
    allowed = launch(tmp_path / "run", base + ["training.max_steps=4", "optimizer.lr=0.5",
                                              "checkpoint.allow_fingerprint_mismatch=true"], nproc=1)
    assert allowed.codes == [0], allowed.explain()
    assert "fingerprint mismatch allowed: config: optimizer.lr: 0.005 there, 0.5 now" in allowed.logs[0]


def test_raising_max_steps_extends_a_finished_run_on_the_longer_schedule(dynamic_data, tmp_path):
    """The steps after the old end take the rates a run planned for the new length has at those steps."""
    base = TINY + data_overrides(dynamic_data) + ["schedule.warmup_steps=2"]
    planned = launch(tmp_path / "planned", base + ["training.max_steps=8"], nproc=1)
    short = launch(tmp_path / "run", base + ["training.max_steps=4"], nproc=1)
    assert planned.codes == [0] and short.codes == [0], planned.explain() + short.explain()
    longer = launch(tmp_path / "run", base + ["training.max_steps=8"], nproc=1)
    assert longer.codes == [0], longer.explain()
    assert "training.max_steps raised from 4 to 8: the run goes on from step 4" in longer.logs[0]
    rates = {r["step"]: r["train/lr"] for r in longer.metrics()}
    assert sorted(rates) == list(range(1, 9))
    assert {k: v for k, v in rates.items() if k > 4} == \
        pytest.approx({r["step"]: r["train/lr"] for r in planned.metrics() if r["step"] > 4}, rel=1e-12)


def test_dead_rank_gives_an_error_not_a_hang(dynamic_data, tmp_path):
    run_dir = tmp_path / "run"
    procs, _ = spawn(run_dir, TINY + data_overrides(dynamic_data) + [
        "training.max_steps=1000", "zero.stage=2", "training.collective_timeout_s=30"])
    wait_for_logged_steps(run_dir, 2)
    procs[1].kill()
    began = time.time()
    try:
        code = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung after rank 1 died")
    assert code != 0
    assert time.time() - began < 120


def test_eval_command_matches_the_in_training_evaluation(dynamic_data, tmp_path):
    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        "training.max_steps=3", "eval.every_steps=3", "eval.max_batches=0", "eval.micro_batch_size=8"], nproc=1)
    assert run.codes == [0], run.explain()
    in_training = run.metrics("eval")[-1]
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "eval", "--checkpoint", str(run.run_dir / "checkpoints"),
                           "--batch-size", "8", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = json.loads(out.read_text())
    for key in ("eval/mlm_accuracy", "eval/mlm_loss", "eval/sentence_accuracy", "eval/masked_tokens"):
        assert standalone[key] == pytest.approx(in_training[key], rel=1e-6), key
    assert "eval/mlm_accuracy" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain", "eval", "--checkpoint", str(tmp_path / "nope")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope does not exist" in bad.stderr


def test_demo_command_runs_the_main_job_end_to_end(tmp_path):
    """The README's main command (`make demo` = `python -m pretrain demo`), shortened, run from
    outside the checkout (the bundled data config's paths are relative to the repository)."""
    proc = subprocess.run([sys.executable, "-m", "pretrain", "demo", "--out", str(tmp_path / "demo"),
                           "training.max_steps=10", "eval.every_steps=5", "eval.max_batches=2",
                           "logging.progress_bar=false", "checkpoint.every_steps=10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("held-out MLM accuracy  step 0:", "HuggingFace export", "transformers.BertForPreTraining fills",
                 "fine-tuned dev accuracy", "tensorboard --logdir"):
        assert line in proc.stdout
    assert (tmp_path / "demo" / "hf" / "config.json").is_file()
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    tuned = json.loads((tmp_path / "demo" / "finetune" / "metrics.json").read_text())
    assert tuned["task"] == "classification" and tuned["mean"]["accuracy"] > 0.5   # the task is balanced
    assert (tmp_path / "demo" / "finetune" / "seed-1" / "hf" / "config.json").is_file()


def test_compile_and_unpad_train_the_same_model_and_resume(dynamic_data, tmp_path):
    """kernels.compile (torch.compile through DeepSpeed's engine.compile) and kernels.unpad compute the
    eager padded model's losses (dropout off, so the draws cannot differ), and a compiled run's
    checkpoint resumes: its parameter names are the eager model's."""
    base = TINY + data_overrides(dynamic_data) + ["zero.stage=1", "schedule.warmup_steps=1", "training.max_steps=4",
                                                  "model.hidden_dropout=0", "model.attention_dropout=0"]
    eager = launch(tmp_path / "eager", base, nproc=1)
    assert eager.codes == [0], eager.explain()
    halted = launch(tmp_path / "fast", base + ["kernels.compile=true", "kernels.unpad=true"], nproc=1,
                    extra_args=["--stop-after-step", "2"])
    assert halted.codes == [75], halted.explain()
    resumed = launch(tmp_path / "fast", base, nproc=1)  # the compiled run's checkpoint, resumed eagerly
    assert resumed.codes == [0], resumed.explain()
    assert "resumed from step-000002 at step 2" in resumed.logs[0]
    assert "runs through torch.compile" in halted.logs[0] and "torch.compile" not in resumed.logs[0]
    expected, got = eager.losses(), {**halted.losses(), **resumed.losses()}
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == pytest.approx([expected[s] for s in range(1, 5)], rel=2e-4)


def test_optimizer_offload_follows_the_same_trajectory(dynamic_data, tmp_path):
    """zero.offload_optimizer=cpu with our client LAMB (DeepSpeed refuses client optimizers under
    offload unless told otherwise): 2 ranks, ZeRO-2, the losses of the run without offload."""
    base = TINY + data_overrides(dynamic_data) + ["zero.stage=2", "training.max_steps=6", "schedule.warmup_steps=1"]
    plain = launch(tmp_path / "plain", base)
    assert plain.codes == [0, 0], plain.explain()
    offload = launch(tmp_path / "offload", base + ["zero.offload_optimizer=cpu"])
    assert offload.codes == [0, 0], offload.explain()
    expected, got = plain.losses(), offload.losses()
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], rel=1e-5)


def test_logged_lr_is_the_rate_each_update_used(dynamic_data, tmp_path):
    """Step s logs the rate of update s (0-based update s-1): linear warmup over 2 updates, then a
    linear decay to 0 at update 6, written out by hand rather than through pretrain.optim."""
    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        "training.max_steps=6", "optimizer.lr=0.01", "schedule.warmup_steps=2", "schedule.decay=linear",
        "schedule.min_lr_ratio=0"], nproc=1)
    assert run.codes == [0], run.explain()
    logged = {r["step"]: r["train/lr"] for r in run.metrics()}
    expected = {1: 0.0, 2: 0.005, 3: 0.01, 4: 0.0075, 5: 0.005, 6: 0.0025}
    assert logged == pytest.approx(expected, abs=1e-12)
