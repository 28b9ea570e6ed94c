"""launch/slurm against a real one-node SLURM (slurmctld + slurmd + munge on localhost).

Every job runs the real `python -m pretrain train` on 2 tasks of 1 CPU (the TINY model, gloo),
submitted with the project's own scripts; only the GPU/size lines of pretrain.sbatch are
overridden on the sbatch command line (TEST_SBATCH).
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import REPO, TEST_SBATCH
from tests.pretrain.training_helpers import DEMO_CORPUS, TINY, data_overrides

pytestmark = pytest.mark.slow
SBATCH = str(REPO / "launch" / "slurm" / "pretrain.sbatch")
STEPS = 60  # long enough to signal a running job after a few steps


def train_args(run_dir: Path, shards: Path, steps: int = STEPS) -> list[str]:
    return ["--config", "configs/debug.yaml", *TINY, f"training.max_steps={steps}", f"logging.run_dir={run_dir}",
            *data_overrides(shards)]


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"}


def job_log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


def explain(slurm, run_dir: Path, job: str) -> str:
    return f"{slurm.job(job)}\n--- job output (tail)\n{job_log(run_dir, job)[-6000:]}"


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    """One job straight to STEPS: the reference every other run is compared with."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job = slurm.sbatch(*TEST_SBATCH, f"--output={run_dir}/slurm-%j.out", SBATCH, *train_args(run_dir, shards))
    return job, slurm.wait(job), run_dir


def test_sbatch_runs_to_completion_and_its_checkpoint_loads(slurm, uninterrupted):
    job, info, run_dir = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        explain(slurm, run_dir, job)
    log = job_log(run_dir, job)
    assert "2 tasks on 1 node(s) localhost" in log and "training finished (exit 0) after 0 requeue(s)" in log
    # both tasks found their identity and the rendezvous from SLURM's variables alone
    assert f"[distributed] slurm: rank 0 (local 0) of 2, master localhost:{20000 + int(job) % 20000} " \
           "(first host of SLURM_JOB_NODELIST)" in log
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    from pretrain.weights import load_model
    model, cfg, extra = load_model(str(run_dir / "checkpoints"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert cfg.model.hidden_size == 32 and cfg.training.max_steps == STEPS
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_usr1_checkpoints_requeues_resumes_and_matches_the_uninterrupted_job(slurm, shards, uninterrupted,
                                                                              tmp_path):
    """`scancel --signal=USR1 --batch`: what SLURM's --signal=B:USR1@N does before the time limit."""
    run_dir = tmp_path
    job = slurm.sbatch(*TEST_SBATCH, f"--output={run_dir}/slurm-%j.out", SBATCH, *train_args(run_dir, shards))
    slurm.wait(job, until=lambda info: len(losses(run_dir)) >= 3 or info["JobState"] in ("COMPLETED", "FAILED"))
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        explain(slurm, run_dir, job)
    log = job_log(run_dir, job)
    for line in ("SIGUSR1 (time limit or preemption near): asking the tasks to checkpoint",
                 "training checkpointed and stopped (exit 75): requeue 1 of at most 20",
                 "run 2 (requeues so far: 1, at most 20)", "resumed from step-",
                 "training finished (exit 0) after 1 requeue(s)"):
        assert line in log, explain(slurm, run_dir, job)
    stopped_at = int(log.split("resumed from step-")[1][:6])
    assert 3 <= stopped_at < STEPS
    reference = losses(uninterrupted[2])
    # CPU fp32 resume is bitwise exact: the same losses at every step, the last one included
    assert losses(run_dir) == reference and len(reference) == STEPS


def test_plain_scancel_with_loader_workers_checkpoints_and_the_rerun_matches(slurm, shards, uninterrupted,
                                                                             tmp_path):
    """`scancel JOBID` (SIGTERM to every process of the step, loader workers included) with
    data.num_workers=2: the tasks checkpoint within KillWait; a new job resumes exactly."""
    run_dir = tmp_path
    args = [*train_args(run_dir, shards), "data.num_workers=2"]
    job = slurm.sbatch(*TEST_SBATCH, f"--output={run_dir}/slurm-%j.out", SBATCH, *args)
    slurm.wait(job, until=lambda info: len(losses(run_dir)) >= 3 or info["JobState"] in ("COMPLETED", "FAILED"))
    slurm.run("scancel", job)
    info = slurm.wait(job)
    assert info["JobState"] == "CANCELLED", explain(slurm, run_dir, job)
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file(), explain(slurm, run_dir, job)
    stopped_at = int(latest.read_text().strip()[len("step-"):])
    assert 3 <= stopped_at < STEPS, explain(slurm, run_dir, job)
    assert "killed by signal" not in job_log(run_dir, job), explain(slurm, run_dir, job)
    rerun = slurm.sbatch(*TEST_SBATCH, f"--output={run_dir}/slurm-%j.out", SBATCH, *args)
    info = slurm.wait(rerun)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), explain(slurm, run_dir, rerun)
    assert f"resumed from step-{stopped_at:06d}" in job_log(run_dir, rerun)
    assert losses(run_dir) == losses(uninterrupted[2])


def test_time_limit_signal_checkpoints_before_the_limit_and_requeues_are_bounded(slurm, shards, tmp_path):
    """--time=2 --signal=B:USR1@60: SLURM itself signals the batch script 60-90 s before the limit
    (its timer runs every 30 s); with MAX_REQUEUES=0 the checkpointed job gives up (exit 75)."""
    run_dir = tmp_path
    job = slurm.sbatch(*TEST_SBATCH, "--time=2", "--signal=B:USR1@60", f"--output={run_dir}/slurm-%j.out", SBATCH,
                       *train_args(run_dir, shards, steps=100_000), env={"MAX_REQUEUES": "0"})
    info = slurm.wait(job, timeout=240)
    log = job_log(run_dir, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), \
        explain(slurm, run_dir, job)
    assert "SIGUSR1 (time limit or preemption near)" in log
    assert "already requeued 0 times (MAX_REQUEUES=0): giving up" in log
    minutes, seconds = map(int, info["RunTime"].split(":")[-2:])
    assert minutes * 60 + seconds < 120, "the job ran into its time limit"
    if "training checkpointed and stopped (exit 75)" in log:
        step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
        assert step == max(losses(run_dir)) > 0
    else:  # the signal came while the tasks were still starting (a very slow machine)
        assert "tasks stopped by SIGUSR1 while starting" in log


def test_submit_pretraining_chains_phase2_after_phase1(slurm, shards, tmp_path):
    out = slurm.run("bash", str(REPO / "launch" / "slurm" / "submit_pretraining.sh"), *TEST_SBATCH,
                    f"--output={tmp_path}/%x-%j.out", "--", *TINY, *data_overrides(shards),
                    env={"PHASE1_CONFIG": "configs/debug.yaml", "PHASE2_CONFIG": "configs/debug.yaml",
                         "RUN_DIR": str(tmp_path), "PHASE1_ARGS": "training.max_steps=6",
                         "PHASE2_ARGS": "training.max_steps=4 optimizer.lr=0.001"}).stdout
    job1 = out.split("phase 1: job ")[1].split()[0]
    job2 = out.split("phase 2: job ")[1].split()[0]
    slurm.submitted += [job1, job2]
    assert f"tensorboard --logdir_spec phase1:{tmp_path}/phase1/tensorboard,phase2:{tmp_path}/phase2/tensorboard" \
        in out
    assert slurm.job(job2)["Dependency"] in (f"afterok:{job1}(unfulfilled)", "(null)")  # (null) once satisfied
    info1, info2 = slurm.wait(job1), slurm.wait(job2)
    logs = {p: (tmp_path / f"bert-{p}-{j}.out").read_text() for p, j in (("phase1", job1), ("phase2", job2))}
    assert (info1["JobState"], info1["ExitCode"]) == ("COMPLETED", "0:0"), logs["phase1"][-5000:]
    assert (info2["JobState"], info2["ExitCode"]) == ("COMPLETED", "0:0"), logs["phase2"][-5000:]
    assert info2["StartTime"] >= info1["EndTime"]
    assert f"initialized from {tmp_path}/phase1/checkpoints: weights" in logs["phase2"]
    assert sorted(losses(tmp_path / "phase1")) == list(range(1, 7))
    assert sorted(losses(tmp_path / "phase2")) == list(range(1, 5))
    # same seed, data and first batch: from scratch, phase 2's first loss would equal phase 1's
    assert losses(tmp_path / "phase2")[1] != losses(tmp_path / "phase1")[1]


def test_data_prep_array_and_merge_match_a_single_node_run(slurm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        corpus.write_text("".join(line for _, line in zip(range(1500), f)), encoding="utf-8")
    config = tmp_path / "data.yaml"
    config.write_text(f"""
seed: 7
workers: 1
progress: false
input: {{paths: [{corpus}], format: text}}
vocab: {{vocab_size: 2048, min_frequency: 2}}
shards: {{seq_len: 128, objective: nsp, masking: static, max_predictions: 20, val_fraction: 0.05,
          text_per_shard_mb: 0.02}}
""")
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(config), "--out", str(single)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = tmp_path / "multi"
    out = slurm.run("bash", str(REPO / "launch" / "slurm" / "submit_data_prep.sh"), "2", str(multi),
                    "--config", str(config),
                    env={"SBATCH_ARGS": f"--cpus-per-task=1 --time=10 --output={tmp_path}/%x-%A_%a.out"}).stdout
    array, merge = out.split("array job ")[1].split()[0], out.split("merge:     job ")[1].split()[0]
    slurm.submitted += [array, merge]
    info = slurm.wait(merge)
    logs = "\n".join(p.name + ":\n" + p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    for task in (0, 1):
        assert f"task {task} of 2" in (tmp_path / f"bert-data-prep-{array}_{task}.out").read_text()
    assert len(list((multi / "shards").glob("manifest.node-*-of-00002.json"))) == 2
    a, b = (json.loads((d / "shards" / "manifest.json").read_text()) for d in (single, multi))
    assert [s for s in a["shards"]] == [s for s in b["shards"]] and len(a["shards"]) >= 4
    for shard in a["shards"]:
        name = shard["name"]
        assert (single / "shards" / name).read_bytes() == (multi / "shards" / name).read_bytes()
    assert (single / "tokenizer" / "vocab.txt").read_bytes() == (multi / "tokenizer" / "vocab.txt").read_bytes()


def test_a_failing_training_fails_the_job_without_requeue(slurm, shards, tmp_path):
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH,
                       *train_args(tmp_path, shards), "training.global_batch_size=15")  # not divisible: exit 2
    info = slurm.wait(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), \
        explain(slurm, tmp_path, job)
    assert "training failed (exit 2): not requeued" in job_log(tmp_path, job)


def test_usr1_before_the_tasks_handle_it_still_counts_as_a_stop(slurm, tmp_path):
    """A stop signal that kills tasks still starting up (no handler yet: exit 138) is treated as a
    stop, not a failure: requeued, here up to MAX_REQUEUES=0, so the job gives up with 75."""
    fake = tmp_path / "python"  # stands in for an interpreter still importing torch
    fake.write_text(f'#!/bin/bash\ntouch "{tmp_path}/started.$SLURM_PROCID"\nexec sleep 120\n')
    fake.chmod(0o755)
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH, "--config", "unused.yaml",
                       env={"PYTHON": str(fake), "MAX_REQUEUES": "0"})
    slurm.wait(job, until=lambda info: len(list(tmp_path.glob("started.*"))) == 2
               or info["JobState"] not in ("PENDING", "RUNNING"))
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job, timeout=60)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), explain(slurm, tmp_path, job)
    assert "tasks stopped by SIGUSR1 while starting (exit 138)" in log and "giving up" in log
