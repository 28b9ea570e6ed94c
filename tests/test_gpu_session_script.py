"""bench/gpu_session.sh, the one prepared script a session with a lent GPU runs, works end to end.

Without a GPU it runs every step in smoke mode (the extension build attempt, tests/ops, the kernel
benchmark with tiny shapes, the training benchmark with the tiny model), so the script a GPU
session depends on is not first run on the GPU's scarce minutes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.slow


def run_stage(out: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **extra_env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_kernels_and_train_stages_leave_their_results(tmp_path):
    import torch

    kernels = run_stage(tmp_path, "kernels")
    assert kernels.returncode == 0, kernels.stdout[-3000:] + kernels.stderr[-3000:]
    for name in ("env.txt", "build.log", "ops_tests.log", "kernels.log", "kernels.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "extension:" in (tmp_path / "build.log").read_text()
    assert " passed" in (tmp_path / "ops_tests.log").read_text()
    assert "LAMB step" in (tmp_path / "kernels.md").read_text()
    if not torch.cuda.is_available():
        assert "smoke mode" in kernels.stdout

    train = run_stage(tmp_path, "train")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    result = json.loads((tmp_path / "train_large_128.json").read_text())
    assert [(r["system"], r["variant"]) for r in result["results"]] == \
        [("ours", "default"), ("ours", "packing"), ("peer", "hf-peer")], result["results"]
    assert all(r["status"] == "ok" for r in result["results"]), result["results"]
    assert "HF peer" in (tmp_path / "train_large_128.md").read_text()

    # LENGTHS_FROM: the instances take a real shard directory's lengths (short documents: packing saves rows)
    from tests.pretrain.training_helpers import build_shards
    shards = build_shards(tmp_path / "demo", "dynamic", lines=300) / "shards"
    train = run_stage(tmp_path, "train", LENGTHS_FROM=str(shards))
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    result = json.loads((tmp_path / "train_large_128_demo.json").read_text())
    assert result["meta"]["lengths"] == f"from the shards in {shards}"
    default, packing = (r for r in result["results"] if r["system"] == "ours")
    assert default["rows_per_step"] == 4 and packing["rows_per_step"] < 4 == packing["sequences_per_step"]
    assert packing["real_token_fraction"] > default["real_token_fraction"]

    assert run_stage(tmp_path, "nonsense").returncode == 2


def test_memory_stage_leaves_the_activation_checkpointing_table(tmp_path):
    memory = run_stage(tmp_path, "memory")
    assert memory.returncode == 0, memory.stdout[-3000:] + memory.stderr[-3000:]
    table = (tmp_path / "memory_base_512.md").read_text()
    assert "| micro batch | peak off, MiB | peak on, MiB |" in table and "checkpointing on :" in table, table
