"""Downstream scores during pretraining (eval.downstream, pretrain/downstream.py).

The suite runs in the background as `python -m pretrain finetune --suite` on the weights of the run's
checkpoints; its scores land in metrics.jsonl and TensorBoard at the checkpoints' steps.  Checked against
the same command run by hand on the checkpoint afterwards, and against a run without downstream
evaluation (training is not perturbed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.downstream import job_environment, link_weights, read_scores
from pretrain.finetune.demo_task import read_words, write_mention_task
from tests.pretrain.training_helpers import DEMO_CORPUS, REPO, TINY, build_shards, data_overrides, launch, spawn

pytestmark = pytest.mark.slow
STEPS = ["training.max_steps=6", "checkpoint.every_steps=3"]
BUDGET = 3          # fine-tuning steps per downstream evaluation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("ds_data"), "dynamic")


def write_suite(root: Path, train: str | None = None) -> Path:
    """A one-task suite: does a passage name Emma (pretrain.finetune.demo_task), one seed."""
    root.mkdir(parents=True, exist_ok=True)
    task_train, dev = write_mention_task(read_words(str(DEMO_CORPUS)), str(root / "task"))
    (root / "mention.yaml").write_text(f"""
task: {{type: classification, train: {train or task_train}, dev: {dev}, text_pair_column: null, max_length: 32}}
training: {{micro_batch_size: 16, global_batch_size: 16, seeds: [1]}}
optimizer: {{lr: 1.0e-3}}
checkpoint: {{best: false}}
logging: {{tensorboard: false, every_steps: 1}}
""")
    suite = root / "suite.yaml"
    suite.write_text("tasks:\n  - name: mention\n    config: mention.yaml\n")
    return suite


def downstream_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "downstream"]


def overrides(data_root: Path, suite: Path | None) -> list[str]:
    extra = [f"eval.downstream={suite}", f"eval.downstream_max_steps={BUDGET}"] if suite else []
    return TINY + data_overrides(data_root) + STEPS + extra


def test_scores_are_logged_at_each_checkpoint_and_equal_the_suite_run_by_hand(data, tmp_path):
    suite = write_suite(tmp_path / "suite")
    plain = launch(tmp_path / "plain", overrides(data, None), nproc=2)
    run = launch(tmp_path / "run", overrides(data, suite), nproc=2)
    assert plain.codes == [0, 0] and run.codes == [0, 0], run.explain()
    assert run.losses() == plain.losses()          # the background job does not touch training

    rows = downstream_rows(run.run_dir)
    assert [r["step"] for r in rows] == [3, 6]
    for row in rows:
        out = run.run_dir / "downstream" / f"step-{row['step']:06d}"
        assert {k: v for k, v in row.items() if k.startswith("downstream/")} == read_scores(str(out))
        assert set(row) >= {"downstream/mention", "downstream/average"}
        with open(out / "mention" / "seed-1" / "metrics.jsonl") as f:      # the budget held
            assert max(r["step"] for r in map(json.loads, f)) == BUDGET

    by_hand = tmp_path / "by_hand"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "finetune", "--suite", str(suite),
                           "--checkpoint", str(run.run_dir / "checkpoints" / "step-000006"), "--out", str(by_hand),
                           f"training.max_steps={BUDGET}", "logging.progress_bar=false"],
                          cwd=REPO, capture_output=True, text=True, env=job_environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_scores(str(by_hand)) == {k: v for k, v in rows[1].items() if k.startswith("downstream/")}
    summary = json.loads((run.run_dir / "downstream" / "step-000006" / "mention" / "metrics.json").read_text())
    assert json.loads((by_hand / "mention" / "metrics.json").read_text()) == summary   # dev loss too, exactly

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    scalars = events.Scalars("downstream/average")
    assert [e.step for e in scalars] == [3, 6]
    assert [e.value for e in scalars] == pytest.approx([r["downstream/average"] for r in rows])


def test_a_stopped_run_evaluates_every_due_checkpoint_once_after_resuming_and_a_finished_one_says_so(data, tmp_path):
    suite = write_suite(tmp_path / "suite")
    run_dir = tmp_path / "run"
    halted = launch(run_dir, overrides(data, suite), nproc=1, extra_args=["--stop-after-step", "3"])
    assert halted.codes == [75], halted.explain()
    assert (run_dir / "downstream" / "step-000003" / "weights" / "model.pt").is_file()
    resumed = launch(run_dir, overrides(data, suite), nproc=1)
    assert resumed.codes == [0], resumed.explain()
    assert sorted(r["step"] for r in downstream_rows(run_dir)) == [3, 6]
    again = launch(run_dir, overrides(data, suite), nproc=1)        # a finished run, run again
    assert again.codes == [0] and "already finished at step 6 (step-000006, training.max_steps=6)" in again.logs[0]
    assert sorted(r["step"] for r in downstream_rows(run_dir)) == [3, 6]


def wait_for(path: Path, text: str, timeout: float = 120, count: int = 1) -> None:
    """Until ``path`` holds ``text`` ``count`` times (a log that earlier attempts wrote to as well)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count(text) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not say {text!r} in {timeout} s:\n{path.read_text()[-3000:] if path.exists() else ''}")


def test_a_stop_or_a_death_while_waiting_for_the_suites_leaves_them_to_the_rerun(data, tmp_path):
    """After the last step rank 0 waits for the queue.  SIGTERM then ends the running suite (it checkpoints)
    and exits 75; kill -9 of rank 0 reaches the suite as SIGTERM (it dies with its parent, checkpointed);
    the rerun of a finished run evaluates what is left, each step once."""
    suite = write_suite(tmp_path / "suite")
    run_dir = tmp_path / "run"
    slow = overrides(data, suite) + ["eval.downstream_max_steps=400", "checkpoint.every_steps=6"]
    child_log = run_dir / "downstream" / "step-000006" / "log.txt"
    for attempt, how in enumerate((signal.SIGTERM, signal.SIGKILL)):
        procs, logs = spawn(run_dir, slow, nproc=1)
        wait_for(logs[0], "waiting for the downstream evaluation of step(s) 6")
        if attempt == 0:       # the suite is training
            wait_for(run_dir / "downstream" / "step-000006" / "mention" / "seed-1" / "metrics.jsonl", '"kind": "train"')
        else:                  # the suite has resumed from the first attempt's checkpoint, and trains on
            wait_for(child_log, "resumed from")
        procs[0].send_signal(how)
        code = procs[0].wait(timeout=120)
        wait_for(child_log, "SIGTERM received: checkpoint saved at step", count=attempt + 1)
        if how == signal.SIGTERM:
            assert code == 75 and "stopped while waiting for the downstream evaluations; exiting with 75" in \
                logs[0].read_text()
        else:
            assert code == -9
    done = launch(run_dir, slow, nproc=1, timeout=600)
    assert done.codes == [0], done.explain()
    assert "already finished at step 6" in done.logs[0]
    assert [r["step"] for r in downstream_rows(run_dir)] == [6]
    printed = (run_dir / "downstream" / "step-000006" / "log.txt").read_text()
    assert printed.count("resumed from") == 2                 # the suite went on from its checkpoints


def test_a_failing_suite_is_reported_and_training_finishes(data, tmp_path):
    suite = write_suite(tmp_path / "suite", train=str(tmp_path / "no_such_train.jsonl"))
    run = launch(tmp_path / "run", overrides(data, suite) + ["checkpoint.every_steps=6"], nproc=1)
    assert run.codes == [0], run.explain()
    assert downstream_rows(run.run_dir) == []
    log = run.run_dir / "downstream" / "step-000006" / "log.txt"
    assert "downstream evaluation of step 6 failed (exit status 2) after" in run.logs[0]
    assert str(log) in run.logs[0] and "no_such_train.jsonl" in log.read_text()


def test_the_suite_and_its_cadence_are_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.downstream: .*missing.yaml: cannot read the suite file"):
        load_config(str(REPO / "configs/debug.yaml"), [f"eval.downstream={tmp_path / 'missing.yaml'}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - name: t\n    config: t.yaml\n")
    (tmp_path / "t.yaml").write_text("training: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=r"eval.downstream: .*tasks\[0\] \(t\): .*training.epochs"):
        load_config(str(REPO / "configs/debug.yaml"), [f"eval.downstream={bad}"])
    with pytest.raises(ConfigError, match=r"eval.downstream_every_steps \(150\) must be a multiple of "
                                          r"checkpoint.every_steps \(100\)"):
        load_config(str(REPO / "configs/debug.yaml"), ["eval.downstream_every_steps=150"])


def test_snapshots_are_links_that_outlive_the_checkpoint(tmp_path):
    ckpt = tmp_path / "step-000003"
    (ckpt / "tokenizer").mkdir(parents=True)
    for name in ("model.pt", "config.yaml", "extra.json", "tokenizer/vocab.txt", "mp_rank_00_model_states.pt"):
        (ckpt / name).write_text(name)
    dest = tmp_path / "weights"
    link_weights(str(ckpt), str(dest))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == \
        ["config.yaml", "extra.json", "model.pt", "tokenizer/vocab.txt"]       # not the optimizer's files
    assert os.stat(dest / "model.pt").st_ino == os.stat(ckpt / "model.pt").st_ino
    for p in sorted(ckpt.rglob("*"), reverse=True):         # keep_last removes the checkpoint
        p.unlink() if p.is_file() else p.rmdir()
    assert (dest / "model.pt").read_text() == "model.pt"


def test_the_suite_job_is_a_single_process_of_its_own():
    from data_prep.procs import PARENT_PID_ENV
    from pretrain.distributed import detect
    launched = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "OMPI_COMM_WORLD_RANK": "0", "PMI_RANK": "0",
                "CUDA_VISIBLE_DEVICES": "4,5,6,7", "PATH": "/bin", "DS_ACCELERATOR": "cuda"}
    env = job_environment(launched, device="cuda:1")
    assert env == {"PATH": "/bin", "DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "5",
                   PARENT_PID_ENV: str(os.getpid())}
    assert detect(env).launcher == "single"
    assert job_environment({}, device="cuda:2")["CUDA_VISIBLE_DEVICES"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in job_environment({}, device="cpu")
