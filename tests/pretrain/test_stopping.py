"""Every way a training job is stopped leaves a checkpoint, and one run directory holds one run.

SIGTERM to the whole process group (what `timeout`, `scancel` and SLURM's time limit deliver) and
Ctrl-C (SIGINT to the group) reach the DataLoader workers too: they leave the signal to the main
process, which checkpoints and exits 75, and no worker outlives it.  A signal that reaches one
rank only stops all ranks at the same step.  A second `pretrain train` in a run directory that is
in use exits 2 at once, naming the pid that holds it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.pretrain.training_helpers import (TINY, Launch, build_shards, data_overrides, launch, spawn,
                                             wait_for_logged_steps)

pytestmark = pytest.mark.slow
# Loader workers on, and evaluations between the steps, so the signal also finds eval workers.
WORKERS = ["data.num_workers=2", "eval.every_steps=2", "eval.max_batches=2", "training.max_steps=400"]


@pytest.fixture(scope="module")
def dynamic_data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("dyn"), "dynamic")


def spawn_in_a_new_group(monkeypatch, run_dir: Path, overrides: list[str], nproc: int = 2):
    """spawn() with all ranks in one new process group, as a shell job or `timeout`'s child is."""
    real_popen, group = subprocess.Popen, []

    def popen(*args, **kwargs):
        proc = real_popen(*args, process_group=group[0] if group else 0, **kwargs)
        group.append(proc.pid)
        return proc

    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", popen)
        procs, _ = spawn(run_dir, overrides, nproc)
    return procs, group[0]


def live_members(pgid: int) -> list[str]:
    """The processes of group ``pgid`` that are not zombies, as 'pid state command'."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):   # ended meanwhile
            continue
        command, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            found.append(f"{entry} {rest[0]} {command}")
    return found


def wait_all(procs, run_dir: Path, timeout: float = 120) -> tuple[list[int], list[str]]:
    """Exit codes and logs of the ranks; a rank still running after ``timeout`` fails the test."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [log.read_text() for log in sorted(run_dir.glob("rank*.log"))]
    if codes is None:
        pytest.fail(f"still running {timeout} s after the signal:\n" + "\n".join(log[-3000:] for log in logs))
    return codes, logs


def saved_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])


def assert_no_member_left(pgid: int) -> None:
    deadline = time.time() + 15
    while live_members(pgid) and time.time() < deadline:
        time.sleep(0.2)
    assert not live_members(pgid), f"left behind: {live_members(pgid)}"


def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(dynamic_data, tmp_path, monkeypatch):
    overrides = TINY + data_overrides(dynamic_data) + WORKERS
    run_dir = tmp_path / "run"
    procs, pgid = spawn_in_a_new_group(monkeypatch, run_dir, overrides)
    wait_for_logged_steps(run_dir, 5)
    os.killpg(pgid, signal.SIGTERM)
    codes, logs = wait_all(procs, run_dir)
    assert codes == [75, 75], "\n".join(log[-3000:] for log in logs)
    stopped = saved_step(run_dir)
    assert f"SIGTERM received: checkpoint saved at step {stopped}; exiting with 75" in logs[0]
    assert not any("Traceback" in log for log in logs), "\n".join(logs)    # e.g. "worker ... killed by signal"
    assert_no_member_left(pgid)
    until = ["--stop-after-step", str(stopped + 3)]
    straight = launch(tmp_path / "straight", overrides, extra_args=until)
    resumed = launch(run_dir, overrides, extra_args=until)
    assert straight.codes == resumed.codes == [75, 75], straight.explain() + resumed.explain()
    assert f"resumed from step-{stopped:06d}" in resumed.logs[0]
    assert resumed.losses() == straight.losses() and max(straight.losses()) == stopped + 3


def test_ctrl_c_checkpoints_and_exits_75_without_a_traceback(dynamic_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    procs, pgid = spawn_in_a_new_group(monkeypatch, run_dir, TINY + data_overrides(dynamic_data) + WORKERS)
    wait_for_logged_steps(run_dir, 5)
    os.killpg(pgid, signal.SIGINT)
    codes, logs = wait_all(procs, run_dir)
    assert codes == [75, 75], "\n".join(log[-3000:] for log in logs)
    assert "interrupted: checkpointing after this step (Ctrl-C again to stop at once, without one)" in logs[0]
    assert f"SIGINT received: checkpoint saved at step {saved_step(run_dir)}; exiting with 75" in logs[0]
    assert not any("Traceback" in log or "KeyboardInterrupt" in log for log in logs)
    assert_no_member_left(pgid)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(dynamic_data, tmp_path):
    run_dir = tmp_path / "run"
    procs, _ = spawn(run_dir, TINY + data_overrides(dynamic_data) + WORKERS + ["training.collective_timeout_s=30"])
    wait_for_logged_steps(run_dir, 5)
    procs[1].send_signal(signal.SIGUSR1)      # the main process of rank 1 only: not rank 0, no worker
    codes, logs = wait_all(procs, run_dir)
    assert codes == [75, 75], "\n".join(log[-3000:] for log in logs)
    assert f"SIGUSR1 received: checkpoint saved at step {saved_step(run_dir)}" in logs[0]


def test_a_second_run_in_a_run_directory_in_use_exits_2_naming_its_pid(dynamic_data, tmp_path):
    overrides = TINY + data_overrides(dynamic_data) + ["training.max_steps=400"]
    run_dir = tmp_path / "run"
    first, _ = spawn(run_dir, overrides, nproc=1)
    try:
        wait_for_logged_steps(run_dir, 2)
        second = launch(run_dir, overrides, timeout=120)
        assert second.codes == [2, 2], second.explain()
        for log in second.logs:
            assert f"error: {run_dir} is in use by pid {first[0].pid}" in log, log[-3000:]
            assert "Traceback" not in log
        first[0].send_signal(signal.SIGTERM)
        assert wait_all(first, run_dir)[0] == [75]
    finally:
        if first[0].poll() is None:
            first[0].kill()
    steps = [r["step"] for r in Launch([], [], run_dir).metrics()]
    assert steps == sorted(set(steps)), "metrics.jsonl got rows from two runs"
    again = launch(run_dir, overrides, nproc=1, extra_args=["--stop-after-step", str(saved_step(run_dir) + 1)])
    assert again.codes == [75], again.explain()    # a finished run's lock file does not block the next


def test_resume_after_a_crash_keeps_one_metrics_row_per_step(dynamic_data, tmp_path):
    """The crashed run logged steps 3-4 after its last checkpoint (step 2); the resumed run logs
    them again, so the first run's rows past its checkpoint go (TensorBoard's purge_step alike)."""
    overrides = TINY + data_overrides(dynamic_data) + ["training.max_steps=6", "checkpoint.every_steps=2",
                                                       "eval.every_steps=3"]
    crashed = launch(tmp_path / "run", overrides, nproc=1, extra_args=["--fault", "kill-during-save@4"])
    assert crashed.codes == [137], crashed.explain()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "tr')          # a row cut short by the crash
    resumed = launch(tmp_path / "run", overrides, nproc=1)
    assert resumed.codes == [0], resumed.explain()
    assert "metrics.jsonl: dropped 4 line(s) logged after step 2" in resumed.logs[0]
    assert [r["step"] for r in resumed.metrics()] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in resumed.metrics("eval")] == [0, 3, 6]


def test_a_rank_that_fails_with_loader_workers_running_still_exits(dynamic_data, tmp_path):
    """An uncaught error leaves the workers to the interpreter's exit, which ends them with
    SIGTERM: from their parent, so they obey it, where a group SIGTERM is dropped."""
    run_dir = tmp_path / "run"
    procs, _ = spawn(run_dir, TINY + data_overrides(dynamic_data) + [
        "data.num_workers=2", "training.max_steps=1000", "training.collective_timeout_s=30"])
    wait_for_logged_steps(run_dir, 2)
    procs[1].kill()
    codes, logs = wait_all(procs[:1], run_dir, timeout=90)
    assert codes[0] not in (0, 75), logs[0][-3000:]
