"""A real one-node SLURM cluster for the launch tests, started by the project's own script.

``launch/slurm/testing/local_cluster.sh start`` installs Debian's slurm-wlm + munge if missing
and starts munged, slurmctld and slurmd on localhost (idempotent: a running cluster is reused).
Its exit status 3 means SLURM cannot be started on this machine (not root, apt unreachable):
the tests skip with its message.  Any other failure is an error, not a skip.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "launch" / "slurm" / "testing" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# The test node has 2 CPUs and no GPU: 2 tasks of 1 CPU, overriding pretrain.sbatch's GPU lines.
TEST_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def start_cluster() -> dict:
    """Start (or reuse) the cluster; return the environment for its clients.  Skips when impossible."""
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot be started here: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        pytest.fail(f"{CLUSTER_SCRIPT} start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    conf = re.search(r"^SLURM_CONF=(.+)$", proc.stdout, re.M).group(1)
    return {"SLURM_CONF": conf}


class SlurmCluster:
    """sbatch / scontrol / scancel against the test cluster, with the job environment tests need."""

    def __init__(self, client_env: dict):
        self.env = {**os.environ, **client_env,
                    "PYTHON": sys.executable,      # pretrain.sbatch runs "$PYTHON -m pretrain train"
                    "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(name, None)  # the jobs must find their identity from SLURM alone
        self.submitted: list[str] = []

    def run(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, env={**self.env, **(env or {})},
                              timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        job = self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, RunTime, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def wait(self, job_id: str, timeout: float = 300, until=None) -> dict:
        """Poll until the job has ended (or ``until(info)`` holds); fail with its state on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if (until(info) if until else info["JobState"] in TERMINAL):
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} did not finish in {timeout} s: {info}")
            time.sleep(0.5)

    def cancel_all(self) -> None:
        if self.submitted:
            self.run("scancel", *self.submitted, check=False)
