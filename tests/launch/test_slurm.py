"""launch/slurm against a real one-node SLURM (slurmctld + slurmd + munge on localhost).

Every job runs the real `python -m pretrain train` on 2 tasks of 1 CPU (the TINY model, gloo),
submitted with the project's own scripts; only the GPU/size lines of pretrain.sbatch are
overridden on the sbatch command line (TEST_SBATCH).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import socket
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
    multi, marker = tmp_path / "multi", tmp_path / "hook.log"
    (tmp_path / "setup.sh").write_text(HOOK % marker)
    out = slurm.run("bash", str(REPO / "launch" / "slurm" / "submit_data_prep.sh"), "2", str(multi),
                    "--config", str(config),
                    env={"SBATCH_ARGS": f"--cpus-per-task=1 --time=10 --output={tmp_path}/%x-%A_%a.out",
                         "BERTFORGE_ENV_HOOK": str(tmp_path / "setup.sh")}).stdout
    array, merge = out.split("array job ")[1].split()[0], out.split("merge:     job ")[1].split()[0]
    slurm.submitted += [array, merge]
    info = slurm.wait(merge)
    logs = "\n".join(p.name + ":\n" + p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    for task in (0, 1):
        assert f"task {task} of 2" in (tmp_path / f"bert-data-prep-{array}_{task}.out").read_text()
    assert len(list((multi / "shards").glob("manifest.node-*-of-00002.json"))) == 2
    # the hook ran in the batch script and in the one task of each job: 2 array tasks and the merge
    assert sorted(marker.read_text().splitlines()) == ["hook ran: step 0 task 0 apptainer no"] * 3 + \
        ["hook ran: step batch task 0 apptainer no"] * 3
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


# ---- environment hook, containers, --exclusive, staging -------------------------------------------
HOOK = """echo "hook ran: step ${SLURM_STEP_ID:-batch} task ${SLURM_PROCID:-} apptainer ${SHIM_INSIDE:-no}" >> "%s"
export BERTFORGE_TEST_HOOKED=yes
"""
APPTAINER_SHIM = """#!/bin/bash
# stands in for apptainer: records its argv, skips `exec`, the options and the image, runs the rest
printf '%%s\\n' "$@" > "%s/apptainer-argv.$SLURM_PROCID"
[[ $1 == exec ]] || exit 64
shift
while [[ $1 == --* ]]; do [[ $1 == --nv ]] && shift || shift 2; done
shift
SHIM_INSIDE=yes exec "$@"
"""


def srun_line(log: str) -> list[str]:
    """The srun command line pretrain.sbatch logged before running it, as words."""
    import shlex
    return shlex.split(log.split("running: ", 1)[1].splitlines()[0])


def test_env_hook_runs_in_the_batch_script_and_in_every_task_inside_apptainer(slurm, tmp_path):
    marker, bin_dir = tmp_path / "hook.log", tmp_path / "bin"
    hook = tmp_path / "setup.sh"
    hook.write_text(HOOK % marker)
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(APPTAINER_SHIM % tmp_path)
    fake = tmp_path / "python"  # records what a task's interpreter saw
    fake.write_text(f'#!/bin/bash\necho "$SLURM_PROCID $BERTFORGE_TEST_HOOKED $SHIM_INSIDE $PWD $*" '
                    f'> "{tmp_path}/task.$SLURM_PROCID"\n')
    for exe in (bin_dir / "apptainer", fake):
        exe.chmod(0o755)
    env = {"PYTHON": str(fake), "BERTFORGE_ENV_HOOK": str(hook), "BERTFORGE_APPTAINER_IMAGE": "/images/bert.sif",
           "BERTFORGE_CONTAINER_MOUNTS": "/data:/data,/scratch", "PATH": f"{bin_dir}:{slurm.env['PATH']}"}
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH, "--config", "x.yaml", env=env)
    info = slurm.wait(job, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), explain(slurm, tmp_path, job)
    assert sorted(marker.read_text().splitlines()) == [
        "hook ran: step 0 task 0 apptainer yes", "hook ran: step 0 task 1 apptainer yes",
        "hook ran: step batch task 0 apptainer no"]
    for rank in (0, 1):
        assert (tmp_path / f"task.{rank}").read_text().split() == \
            [str(rank), "yes", "yes", str(REPO), "-m", "pretrain", "train", "--config", "x.yaml"]
        argv = (tmp_path / f"apptainer-argv.{rank}").read_text().splitlines()
        assert argv[:7] == ["exec", "--nv", "--pwd", str(REPO), "--bind", "/data:/data,/scratch", "/images/bert.sif"]
        assert argv[7:9] == ["bash", "-c"] and argv[10:] == [str(hook), str(fake), "-m", "pretrain", "train",
                                                             "--config", "x.yaml"]
    assert srun_line(job_log(tmp_path, job))[4:12] == ["apptainer", *argv[:7]]


def test_a_hook_failing_in_the_tasks_fails_the_job_without_requeue(slurm, tmp_path):
    hook = tmp_path / "setup.sh"
    hook.write_text('[[ -z ${SLURM_STEP_ID:-} ]]  # true in the batch script, false in a task\n')
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH, "--config", "x.yaml",
                       env={"BERTFORGE_ENV_HOOK": str(hook)})
    info = slurm.wait(job, timeout=60)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), explain(slurm, tmp_path, job)
    assert log.count(f"{hook}: sourcing it failed on {socket.gethostname()}") == 2
    assert "training failed (exit 2): not requeued" in log


def test_pyxis_container_options_are_srun_options(slurm, tmp_path):
    """pyxis is not installed here: the logged srun line is checked, and srun's own rejection of
    --container-image shows that srun parsed it as one of its options (not as the task's command)."""
    image = "nvcr.io#nvidia/pytorch:24.01-py3"
    env = {"BERTFORGE_CONTAINER_IMAGE": image, "BERTFORGE_CONTAINER_MOUNTS": "/data:/data:ro,/scratch:/scratch"}
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH, "--config", "x.yaml", env=env)
    info = slurm.wait(job, timeout=60)
    log = job_log(tmp_path, job)
    assert srun_line(log) == [
        "srun", "--kill-on-bad-exit=0", "--wait=120", "--cpus-per-task=1", f"--container-image={image}",
        f"--container-workdir={REPO}", "--container-mounts=/data:/data:ro,/scratch:/scratch", sys.executable,
        "-m", "pretrain", "train", "--config", "x.yaml"], log
    assert f"srun: unrecognized option '--container-image={image}'" in log
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "255:0") and "training failed (exit 255)" in log


@pytest.mark.parametrize("env, error", [
    ({"BERTFORGE_CONTAINER_IMAGE": "a.sqsh", "BERTFORGE_APPTAINER_IMAGE": "b.sif"},
     "launch/slurm: BERTFORGE_CONTAINER_IMAGE (pyxis) and BERTFORGE_APPTAINER_IMAGE (apptainer) are both set: set one"),
    ({"BERTFORGE_ENV_HOOK": "/nonexistent/setup.sh"},
     "launch/slurm: BERTFORGE_ENV_HOOK=/nonexistent/setup.sh: sourcing it failed"),
])
@pytest.mark.parametrize("script", ["pretrain.sbatch", "data_prep.sbatch"])
def test_bad_container_or_hook_settings_stop_the_script_with_one_line(script, env, error):
    """Checked before anything runs: the script itself, outside SLURM, exits 2 with the message."""
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), "--config", "x.yaml"], capture_output=True,
                          text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(REPO), **env},
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == error, proc.stderr


def test_submit_pretraining_makes_multi_node_jobs_exclusive_unless_told_otherwise(slurm, tmp_path):
    def submit(*options: str) -> list[dict]:
        out = slurm.run("bash", str(REPO / "launch" / "slurm" / "submit_pretraining.sh"), "--hold", *options,
                        "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                        f"--output={tmp_path}/%x-%j.out",
                        env={"PHASE1_CONFIG": "configs/debug.yaml", "PHASE2_CONFIG": "configs/debug.yaml",
                             "RUN_DIR": str(tmp_path)}).stdout
        jobs = [out.split(f"phase {p}: job ")[1].split()[0] for p in (1, 2)]
        slurm.submitted += jobs
        infos = [slurm.job(j) for j in jobs]
        slurm.run("scancel", *jobs)
        return infos
    # --nodes=1-2: may get two nodes (this cluster has one, which keeps the job submittable)
    assert [(i["NumNodes"], i["OverSubscribe"]) for i in submit("--nodes=1-2")] == [("1-2", "NO")] * 2
    assert [i["OverSubscribe"] for i in submit("-N", "1-2", "--oversubscribe")] == ["YES"] * 2
    assert [i["OverSubscribe"] for i in submit("--nodes=1")] == ["OK"] * 2


def test_staging_copies_verifies_and_the_training_reads_the_copy(slurm, shards, tmp_path):
    """BERTFORGE_STAGE_SHARDS=1 with a damaged copy already in data.cache_dir (same manifest, one
    shard's bytes changed): it is found by the verifier, copied again, and the training reads the copy."""
    source = shards / "shards"
    digest = hashlib.sha256(str(source).encode("utf-8")).hexdigest()[:16]
    copy = tmp_path / "cache" / "staged" / digest / shards.name  # the source's name: its parent (before shards)
    shutil.copytree(source, copy)
    damaged = copy / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    hook = tmp_path / "setup.sh"          # what it prints must not reach the override the staging prints
    hook.write_text('echo "environment ready"\n')
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH,
                       *train_args(run_dir, shards, steps=4), f"data.cache_dir={tmp_path / 'cache'}",
                       env={"BERTFORGE_STAGE_SHARDS": "1", "BERTFORGE_ENV_HOOK": str(hook)})
    info = slurm.wait(job)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), explain(slurm, tmp_path, job)
    assert log.count(f"[stage_shards {socket.gethostname()}]") == 2  # one task on the one node
    assert f"{copy}/train-000001.tar: corrupted: sha256 " in log and "copying again" in log
    assert f"{source} -> {copy}: copied, verified" in log
    assert f"training reads the staged copies: data.dir={copy}" in log
    assert srun_line(log)[-1] == f"data.dir={copy}"
    for f in source.iterdir():
        if f.is_file():
            assert (copy / f.name).read_bytes() == f.read_bytes()
    from pretrain.weights import load_model
    _, cfg, _ = load_model(str(run_dir / "checkpoints"))
    assert cfg.data.dir == str(copy) and sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_usr1_during_the_staging_requeues_before_any_training(slurm, shards, tmp_path):
    """The stop signal while the shards are being staged (the hook holds the staging step for a while) is
    held until the staging ends, then the job goes back to the queue (here MAX_REQUEUES=0: it gives up
    with 75) without starting the training."""
    hook = tmp_path / "setup.sh"
    hook.write_text(f'if [[ ${{SLURM_STEP_ID:-batch}} == 0 ]]; then touch "{tmp_path}/staging"; sleep 5; fi\n')
    job = slurm.sbatch(*TEST_SBATCH, f"--output={tmp_path}/slurm-%j.out", SBATCH,
                       *train_args(tmp_path / "run", shards, steps=4), f"data.cache_dir={tmp_path / 'cache'}",
                       env={"BERTFORGE_STAGE_SHARDS": "1", "BERTFORGE_ENV_HOOK": str(hook), "MAX_REQUEUES": "0"})
    slurm.wait(job, until=lambda info: (tmp_path / "staging").exists()
               or info["JobState"] not in ("PENDING", "RUNNING"))
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job, timeout=120)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), explain(slurm, tmp_path, job)
    assert "SIGUSR1 (time limit or preemption near) during the staging" in log
    assert ("stopped during the staging, before any training, but the job was already requeued 0 times "
            "(MAX_REQUEUES=0): giving up") in log
    assert "copied, verified" in log and "running: srun" not in log


def test_staging_a_mixture_copies_the_local_source_and_keeps_names_and_weights(shards, tmp_path):
    """stage_shards.py on its own (no SLURM): of data.sources, the local directory is staged and the
    URL left to the loader's cache; the printed override keeps every source's name and weight."""
    cache = tmp_path / "cache"
    sources = f"[{{dir: {shards / 'shards'}, weight: 3}}, {{dir: 'https://data.example.org/wiki-128', name: wiki}}]"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm" / "stage_shards.py"), "--config",
                           "configs/debug.yaml", f"data.sources={sources}", f"data.cache_dir={cache}",
                           "--stop-after-step", "3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    digest = hashlib.sha256(str(shards / "shards").encode("utf-8")).hexdigest()[:16]
    copy = cache / "staged" / digest / shards.name
    key, _, value = proc.stdout.strip().partition("=")
    assert key == "data.sources" and json.loads(value) == [
        {"dir": str(copy), "weight": 3.0, "name": shards.name},
        {"dir": "https://data.example.org/wiki-128", "weight": 1.0, "name": "wiki"}]
    assert (copy / "manifest.json").read_bytes() == (shards / "shards" / "manifest.json").read_bytes()
    no_cache = subprocess.run([sys.executable, str(REPO / "launch" / "slurm" / "stage_shards.py"), "--config",
                               "configs/debug.yaml", f"data.dir={shards / 'shards'}"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
    assert no_cache.returncode == 2 and no_cache.stderr.strip() == \
        "error: BERTFORGE_STAGE_SHARDS=1 needs data.cache_dir (a node-local directory to copy the shards to)"
