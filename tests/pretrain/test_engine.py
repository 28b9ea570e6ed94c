"""The training engine's boundary and its plain-data pieces (fast, no process group)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pretrain.config import Config, OptimizerConfig, TrainingConfig, ZeroConfig
from pretrain.engine import deepspeed_config
from pretrain.faults import NO_FAULTS, Faults

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "data_prep", "launch", "bench")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_only_the_engine_package_imports_deepspeed():
    importers = sorted(str(p.relative_to(REPO)) for p in _sources()
                       if any(n == "deepspeed" or n.startswith("deepspeed.") for n in _imports(p)))
    assert importers and all(p.startswith("pretrain/engine/") for p in importers), importers


def test_optim_is_plain_pytorch():
    """The optimizers know nothing of the engine that wraps them (no import cycle either way)."""
    for path in sorted((REPO / "pretrain" / "optim").rglob("*.py")):
        ours = {n for n in _imports(path) if n.split(".")[0] in ("pretrain", "deepspeed")}
        assert all(n.startswith(("pretrain.optim", "pretrain.ops", "pretrain.config")) for n in ours), (path, ours)


def test_deepspeed_config_is_derived_from_ours():
    cfg = Config(optimizer=OptimizerConfig(max_grad_norm=2.0),
                 zero=ZeroConfig(stage=2, reduce_bucket_size=1000, allgather_bucket_size=3000),
                 training=TrainingConfig(micro_batch_size=4, global_batch_size=64, precision="bf16"))
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 4, 4)
    assert ds["gradient_clipping"] == 2.0 and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert (zero["stage"], zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (2, 1000, 3000)
    assert "checkpoint" not in ds
    assert deepspeed_config(cfg, world_size=4, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_faults_parse_and_nothing_by_default():
    assert Faults.parse(None) is NO_FAULTS and Faults.parse("") is NO_FAULTS
    assert Faults.parse("kill-during-save@4") == Faults(kill_during_save=4)
    assert Faults.parse("nan-loss@3-5").nan_loss == {3, 4, 5}
    assert Faults.parse("nan-loss@2").nan_loss == {2}
    for bad in ("nan-loss", "nan-loss@x", "kill-during-save@1-2", "explode@3"):
        with pytest.raises(ValueError, match="expected kill-during-save@STEP or nan-loss@A"):
            Faults.parse(bad)
