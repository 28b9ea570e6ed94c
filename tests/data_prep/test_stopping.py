"""Stopping a multi-worker `data_prep shards` run: kill -9, SIGTERM and Ctrl-C of the main process.

A run is started as its own process group (as a job step is), so that every process it started
can be found, and killed in teardown, by the group id.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data_prep.conftest import REPO, english_docs, write_lines

CLI = [sys.executable, "-m", "data_prep"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A corpus and tokenizer for which a 2-worker shards run takes a few seconds."""
    root = tmp_path_factory.mktemp("slow")
    corpus = write_lines(root / "en.txt", english_docs(2_000_000))
    tok = root / "tok"
    subprocess.run(CLI + ["vocab", "--input", str(corpus), "--vocab-size", "1000", "--out", str(tok)],
                   check=True, env=ENV, capture_output=True)
    return corpus, tok


def slow_shards_args(inputs: tuple[Path, Path], out: Path) -> list[str]:
    corpus, tok = inputs
    return CLI + ["shards", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--workers", "2",
                  "--text-per-shard-mb", "0.1", "--dupe-factor", "10", "--masking", "static", "--no-progress"]


def finished_shards(out: Path) -> int:
    """Shards with a finished progress record (one that has the shard's sha256)."""
    return sum('"sha256"' in p.read_text() for p in (out / "progress").glob("*.json"))


def start_slow_run(inputs, out: Path, early: bool = False) -> subprocess.Popen:
    """Start a run in its own process group; return once it has finished a shard and is building more
    (``early``: once a worker is writing the first shard, while units wait in the pool's queue)."""
    proc = subprocess.Popen(slow_shards_args(inputs, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60

    def started() -> bool:
        if early:
            return bool(list(out.glob(".tmp-*.tar.*")))
        return (out / "progress").is_dir() and finished_shards(out) > 0

    while not started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
    return proc


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.05)
    return not group_alive(pgid)


@pytest.fixture
def started():
    procs = []
    yield procs
    for proc in procs:  # whatever is left of a failed test
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kill_9_of_the_main_process_takes_its_workers_along(slow_inputs, tmp_path, started):
    out = tmp_path / "out"
    proc = start_slow_run(slow_inputs, out)
    started.append(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_at_kill = sorted(p.name for p in out.glob("*.tar"))
    assert wait_group_gone(proc.pid, 5), "processes of the killed run are still running"
    time.sleep(1)
    assert sorted(p.name for p in out.glob("*.tar")) == shards_at_kill, "a shard was committed after the kill"
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("how", ["sigterm-main", "sigterm-main-early", "sigint-group"])
def test_sigterm_or_ctrl_c_stops_the_workers_with_a_clear_exit(slow_inputs, tmp_path, started, how):
    out = tmp_path / "out"
    proc = start_slow_run(slow_inputs, out, early=how.endswith("early"))
    started.append(proc)
    if how.startswith("sigterm"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    expected = 130 if how == "sigint-group" else 128 + signal.SIGTERM
    assert proc.returncode == expected, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "finished shards are kept; rerun the same command to resume" in err.strip().splitlines()[-1]
    assert wait_group_gone(proc.pid, 5), "worker processes outlived the stopped run"
    resumed = subprocess.run(slow_shards_args(slow_inputs, out), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert how.endswith("early") or " 0 already done" not in resumed.stderr
