"""launch/mpi/run.sh under a real mpirun (Debian's OpenMPI), with and without mpi4py.

The one-host runs train the TINY debug config on 2 ranks with no MASTER_ADDR/MASTER_PORT
anywhere: without mpi4py (an mpi4py that fails to import shadows the installed one) every rank
falls back to 127.0.0.1 and a port derived from the MPI job id; with mpi4py, rank 0 broadcasts
127.0.0.1 and a free port over MPI.  Then one rank on each of two network-namespace "hosts".
All trajectories must be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain.training_helpers import REPO, TINY, data_overrides

pytestmark = pytest.mark.slow
RUN_SH = REPO / "launch" / "mpi" / "run.sh"
INSTALL = REPO / "launch" / "mpi" / "testing" / "install_openmpi.sh"
STEPS = 4


@pytest.fixture(scope="session")
def mpirun() -> str:
    proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"OpenMPI cannot be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def mpi_train(run_dir: Path, shards: Path, env: dict | None = None) -> tuple[int, str, dict]:
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run_env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", **(env or {}))
    proc = subprocess.run(["bash", str(RUN_SH), "-np", "2", "--oversubscribe", "--",
                           "--config", "configs/debug.yaml", *TINY, f"training.max_steps={STEPS}",
                           f"logging.run_dir={run_dir}", *data_overrides(shards)],
                          capture_output=True, text=True, cwd=REPO, env=run_env, timeout=400)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    return proc.returncode, proc.stdout + proc.stderr, {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def without_mpi4py(mpirun, shards, tmp_path_factory):
    """The reference run: an mpi4py that fails to import shadows the installed one (if any)."""
    tmp = tmp_path_factory.mktemp("no-mpi4py")
    (tmp / "shadow" / "mpi4py").mkdir(parents=True)
    (tmp / "shadow" / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py hidden by the test')\n")
    return mpi_train(tmp / "run", shards, env={"PYTHONPATH": str(tmp / "shadow")})


def test_mpirun_trains_to_completion_without_mpi4py(without_mpi4py):
    code, log, losses = without_mpi4py
    assert code == 0, log[-6000:]
    assert "[distributed] openmpi: rank 0 (local 0) of 2, master 127.0.0.1:" in log
    assert "(one node, no mpi4py: loopback)" in log
    assert sorted(losses) == list(range(1, STEPS + 1))


def test_mpirun_with_mpi4py_broadcasting_the_master_matches(mpirun, shards, tmp_path, without_mpi4py):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'bertforge[mpi]')")
    code, log, losses = mpi_train(tmp_path, shards)
    assert code == 0, log[-6000:]
    assert "[distributed] openmpi: rank 0 (local 0) of 2, master 127.0.0.1:" in log
    assert "(rank 0's address and port, broadcast over MPI (mpi4py))" in log
    assert losses == without_mpi4py[2] and len(losses) == STEPS

NETNS = {"10.77.0.1": "bfhost0", "10.77.0.2": "bfhost1"}  # test hosts this test creates, and only these


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def netns_hosts():
    """Two "hosts": network namespaces joined by a veth pair, each end named bf0, with their own
    addresses; nothing connects them to any other network."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for ns in NETNS.values():
        _ip("netns", "del", ns)
    steps = [("netns", "add", ns) for ns in NETNS.values()]
    steps += [("link", "add", "bfnet0", "type", "veth", "peer", "name", "bfnet1")]
    for i, (addr, ns) in enumerate(NETNS.items()):
        steps += [("link", "set", f"bfnet{i}", "netns", ns), ("-n", ns, "link", "set", f"bfnet{i}", "name", "bf0"),
                  ("-n", ns, "addr", "add", f"{addr}/24", "dev", "bf0"), ("-n", ns, "link", "set", "bf0", "up"),
                  ("-n", ns, "link", "set", "lo", "up")]
    try:
        for step in steps:
            proc = _ip(*step)
            if proc.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: ip {' '.join(step)}: {proc.stderr.strip()}")
        yield list(NETNS)
    finally:
        for ns in NETNS.values():
            _ip("netns", "del", ns)


def test_mpirun_over_two_hosts_in_network_namespaces(mpirun, shards, tmp_path, netns_hosts, without_mpi4py):
    """One rank per "host"; mpirun starts the remote daemon through netns_rsh.sh (its ssh); rank 0
    broadcasts its bf0 address over MPI (without mpi4py: MASTER_ADDR, exported here, suffices);
    gloo talks over bf0.  Same losses as on one host."""
    agent = REPO / "launch" / "mpi" / "testing" / "netns_rsh.sh"
    first, _ = netns_hosts
    try:
        import mpi4py  # noqa: F401
        broadcast = True
    except ImportError:
        broadcast = False
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run_env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="bf0",
                   NETNS_HOSTS=" ".join(f"{a}={n}" for a, n in NETNS.items()))
    if not broadcast:
        run_env["MASTER_ADDR"] = first
    run_dir = tmp_path / "run"
    proc = subprocess.run(["ip", "netns", "exec", NETNS[first], "bash", str(RUN_SH), "-np", "2",
                           "-H", ",".join(netns_hosts), "--mca", "plm_rsh_agent", str(agent),
                           "--mca", "oob_tcp_if_include", "bf0", "--mca", "btl_tcp_if_include", "bf0",
                           "--mca", "btl", "tcp,self", "--",
                           "--config", "configs/debug.yaml", *TINY, f"training.max_steps={STEPS}",
                           f"logging.run_dir={run_dir}", *data_overrides(shards)],
                          capture_output=True, text=True, cwd=REPO, env=run_env, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert f"[distributed] openmpi: rank 0 (local 0) of 2, master {first}:" in log
    assert ("broadcast over MPI (mpi4py)" if broadcast else "(MASTER_ADDR)") in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"} == without_mpi4py[2]
