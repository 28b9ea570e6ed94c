"""A received checkpoint never runs code, and a damaged one gives a one-line error naming the file.

A payload (a pickled object whose ``__reduce__`` writes a marker file) is planted in each ``.pt``
file of a real checkpoint; resuming, initializing from it (weights and optimizer state),
resuming with another world size (DeepSpeed's universal conversion), eval and export must all
refuse it, naming the file, and the marker must never appear.  A damaged checkpoint, or a
failed checkpoint write, gives one line naming the file; `latest` keeps naming a complete one.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain.training_helpers import REPO, TINY, build_shards, data_overrides, launch

pytestmark = pytest.mark.slow

BASE = TINY + ["zero.stage=1", "training.max_steps=6", "checkpoint.every_steps=2"]
TRAINER_STATE = "rank00000_trainer_state.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant_payload(path: Path, marker: Path) -> None:
    """Add a payload entry to the dict stored in ``path`` (a file we just wrote ourselves)."""
    content = torch.load(path, weights_only=False)
    content["payload"] = Payload(marker)
    torch.save(content, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("data"), "dynamic")


@pytest.fixture(scope="module")
def halted(data, tmp_path_factory):
    """A 1-rank run stopped after step 4: checkpoints step-000002 and step-000004 (latest)."""
    run_dir = tmp_path_factory.mktemp("halted") / "run"
    run = launch(run_dir, BASE + data_overrides(data), nproc=1, extra_args=["--stop-after-step", "4"])
    assert run.codes == [75], run.explain()
    return run_dir


def copy_run(halted: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(halted, run_dir)
    return run_dir


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ")]


def assert_refused(run, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert all(code == 2 for code in run.codes), run.explain()
    assert "Traceback" not in run.logs[0], run.explain()
    errors = error_lines(run.logs[0])
    assert len(errors) == 1 and str(path) in errors[0], run.explain()


@pytest.mark.parametrize("name", [TRAINER_STATE, MODEL_STATES, OPTIM_STATES])
def test_payload_in_a_checkpoint_file_is_refused_on_resume(data, halted, tmp_path, name):
    run_dir = copy_run(halted, tmp_path)
    path, marker = run_dir / "checkpoints" / "step-000004" / name, tmp_path / "marker"
    plant_payload(path, marker)
    assert_refused(launch(run_dir, BASE + data_overrides(data), nproc=1), path, marker)


def test_payload_is_refused_when_resuming_with_another_world_size(data, halted, tmp_path):
    run_dir = copy_run(halted, tmp_path)
    path, marker = run_dir / "checkpoints" / "step-000004" / OPTIM_STATES, tmp_path / "marker"
    plant_payload(path, marker)
    assert_refused(launch(run_dir, BASE + data_overrides(data), nproc=2), path, marker)


@pytest.mark.parametrize("name", ["model.pt", MODEL_STATES, OPTIM_STATES])
def test_payload_is_refused_by_init_from_with_the_optimizer(data, halted, tmp_path, name):
    source = copy_run(halted, tmp_path)
    path, marker = source / "checkpoints" / "step-000004" / name, tmp_path / "marker"
    plant_payload(path, marker)
    run = launch(tmp_path / "phase2", BASE + data_overrides(data) + [
        f"checkpoint.init_from={source / 'checkpoints'}", "checkpoint.init_optimizer=true"], nproc=1)
    assert_refused(run, path, marker)


@pytest.mark.parametrize("init_from", ["missing", "not_a_checkpoint", "bad_config"])
def test_an_init_from_that_is_not_a_checkpoint_is_one_line(data, halted, tmp_path, init_from):
    source = copy_run(halted, tmp_path) / "checkpoints" / "step-000004"
    if init_from == "missing":
        source = tmp_path / "nowhere"
    elif init_from == "not_a_checkpoint":
        source = source / "fingerprints.json"
    else:
        (source / "config.yaml").write_text("model: {hidden_size: abc}\n")
    run = launch(tmp_path / "phase2", BASE + data_overrides(data) + [f"checkpoint.init_from={source}"], nproc=1)
    assert run.codes == [2] and "Traceback" not in run.logs[0], run.explain()
    errors = error_lines(run.logs[0])
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint.init_from: ") and str(source) in errors[0], \
        run.explain()


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
def test_a_bad_launcher_environment_is_one_line(data, tmp_path, launcher):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MV2_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7",
                "SLURM_JOB_NODELIST": "node[1-2"} if launcher == "slurm" else {"RANK": "5", "WORLD_SIZE": "2"})
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "configs/debug.yaml", *BASE,
                           f"logging.run_dir={tmp_path / 'run'}", *data_overrides(data)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and ("node[1-2" if launcher == "slurm" else "rank 5") in errors[0], proc.stderr


@pytest.mark.parametrize("command", [["eval"], ["export", "--out", "HF"]])
def test_payload_in_model_pt_is_refused_by_eval_and_export(halted, tmp_path, command):
    source = copy_run(halted, tmp_path)
    path, marker = source / "checkpoints" / "step-000004" / "model.pt", tmp_path / "marker"
    plant_payload(path, marker)
    args = [str(tmp_path / "hf") if a == "HF" else a for a in command]
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args, "--checkpoint", str(source / "checkpoints")],
                          cwd=REPO, capture_output=True, text=True)
    assert not marker.exists(), "the payload ran"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00not json")
    else:
        path.unlink()


@pytest.mark.parametrize("name,how", [(TRAINER_STATE, "truncate"), (MODEL_STATES, "truncate"),
                                      (OPTIM_STATES, "remove"), ("fingerprints.json", "garbage")])
def test_damaged_checkpoint_names_the_file_and_offers_the_previous_one(data, halted, tmp_path, name, how):
    run_dir = copy_run(halted, tmp_path)
    root = run_dir / "checkpoints"
    path = root / "step-000004" / name
    damage(path, how)
    run = launch(run_dir, BASE + data_overrides(data), nproc=1)
    assert run.codes == [2] and "Traceback" not in run.logs[0], run.explain()
    errors = error_lines(run.logs[0])
    assert len(errors) == 1, run.explain()
    assert f"{root / 'step-000004'} is damaged ({path}: " in errors[0]
    assert f"the previous checkpoint is step-000002: point latest at it (echo step-000002 > {root / 'latest'})" \
        in errors[0]


def test_following_the_advice_resumes_from_the_previous_checkpoint(data, halted, tmp_path):
    run_dir = copy_run(halted, tmp_path)
    root = run_dir / "checkpoints"
    damage(root / "step-000004" / MODEL_STATES, "truncate")
    (root / "latest").write_text("step-000002\n")
    run = launch(run_dir, BASE + data_overrides(data), nproc=1)
    assert run.codes == [0], run.explain()
    assert "resumed from step-000002 at step 2" in run.logs[0]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG in processes started within (Python ignores
    SIGXFSZ): a real write failure, like a full disk, on the real write path."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous_checkpoint(data, halted, tmp_path):
    run_dir = copy_run(halted, tmp_path)
    root = run_dir / "checkpoints"
    with file_size_limit(200_000):   # the logs fit, DeepSpeed's model states (~0.4 MB) do not
        run = launch(run_dir, BASE + data_overrides(data), nproc=1)
    assert run.codes == [2] and "Traceback" not in run.logs[0], run.explain()
    errors = error_lines(run.logs[0])
    assert len(errors) == 1, run.explain()
    assert f"checkpoint step-000006 was not saved ({root / '.tmp-step-000006'}/" in errors[0]
    assert "could not be written (" in errors[0] and "free on its filesystem" in errors[0]
    assert f"{root / 'latest'} still names step-000004" in errors[0]
    assert (root / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("step-", ".tmp"))) == \
        ["step-000002", "step-000004"]


def test_failed_weights_write_leaves_no_partial_file(tmp_path):
    from pretrain.config import Config, ModelConfig
    from pretrain.model import build_model
    from pretrain.weights import CheckpointError, save_weights
    cfg = Config(model=ModelConfig(vocab_size=2048, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    state_dict = build_model(cfg.model).state_dict()
    with file_size_limit(100_000), pytest.raises(CheckpointError) as err:
        save_weights(str(tmp_path), cfg, state_dict)
    assert str(err.value).startswith(f"{tmp_path / 'model.pt'}: could not be written (")
    assert os.listdir(tmp_path) == []


def test_export_ships_the_runs_own_tokenizer_from_any_directory(data, tmp_path):
    """data.tokenizer relative to where training ran: export elsewhere finds another directory at
    that relative path; it must ship the copy kept in the checkpoint, not that one."""
    relative = os.path.relpath(data / "tokenizer", REPO)
    run = launch(tmp_path / "run", TINY + [f"data.dir={data / 'shards'}", f"data.tokenizer={relative}",
                                           "zero.stage=0", "training.max_steps=2"], nproc=1)
    assert run.codes == [0], run.explain()
    elsewhere = tmp_path / "a" / "b"
    (elsewhere / relative).mkdir(parents=True)
    (elsewhere / relative / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "export", "--checkpoint", str(run.run_dir / "checkpoints"),
                           "--out", str(tmp_path / "hf")], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "vocab.txt").read_text() == (data / "tokenizer" / "vocab.txt").read_text()


def test_a_checkpoint_of_a_format_1_directory_resumes_on_its_converted_copy_only(data, tmp_path):
    """The data fingerprint a format-1 run recorded is accepted from the directory `data_prep convert`
    made of it (the same samples in the same order), and from no other directory."""
    from data_prep.cli import main
    from pretrain import checkpoint as ckpt
    from pretrain.config import DataConfig, SourceConfig, TrainingConfig, load_config
    from pretrain.data import open_split
    from tests.data_prep.test_convert import v1_dir

    v1, converted = tmp_path / "v1", tmp_path / "converted"
    v1_dir(data / "shards", v1)                         # recorded fingerprint: "f" * 64
    assert main(["convert", str(v1), "--out", str(converted)]) == 0
    cfg, training = load_config(None, TINY), TrainingConfig(seq_len=128, max_predictions=20)

    def prints(*dirs: str) -> dict:
        sources = [SourceConfig(dir=d, name=f"s{i}") for i, d in enumerate(dirs)]
        mixture = open_split(DataConfig(sources=sources), "train", training, model_vocab_size=2048)
        return ckpt.fingerprints(cfg, mixture.fingerprint, mixture.tokenizer_hash, mixture.converted_from)

    on_converted, on_original = prints(str(converted)), prints(str(data / "shards"))
    taken_on_v1 = {**on_converted, "data": "f" * 64}
    del taken_on_v1[ckpt.CONVERTED_FROM]                # as a run before format 2 wrote it
    assert on_converted[ckpt.CONVERTED_FROM] == "f" * 64 and ckpt.CONVERTED_FROM not in on_original
    assert ckpt.check_fingerprints(taken_on_v1, on_converted, "ckpt", allow_mismatch=False) == []
    assert ckpt.check_fingerprints(on_converted, on_converted, "ckpt", allow_mismatch=False) == []
    for current in (on_original, prints(str(converted), str(data / "shards"))):   # not converted; a mixture
        with pytest.raises(ckpt.CheckpointError, match="data: checkpoint 'f{64}' != this run"):
            ckpt.check_fingerprints(taken_on_v1, current, "ckpt", allow_mismatch=False)


def test_a_run_checkpointed_on_a_format_1_directory_resumes_on_its_converted_copy(data, halted, tmp_path):
    """The halted run's latest checkpoint, recorded as a format-1 run recorded it (the v1 manifest's
    fingerprint), resumes on the converted directory with the batches it would have had, and is
    refused on a directory that was not converted from it."""
    import json

    from data_prep.cli import main
    from tests.data_prep.test_convert import v1_dir

    v1, converted = tmp_path / "v1", tmp_path / "converted"
    v1_dir(data / "shards", v1)                         # recorded fingerprint: "f" * 64
    assert main(["convert", str(v1), "--out", str(converted)]) == 0
    straight = launch(copy_run(halted, tmp_path / "straight"), BASE + data_overrides(data), nproc=1)
    assert straight.codes == [0], straight.explain()
    run_dir = copy_run(halted, tmp_path / "v1-run")
    prints = run_dir / "checkpoints" / "step-000004" / "fingerprints.json"
    prints.write_text(json.dumps({**json.loads(prints.read_text()), "data": "f" * 64}))
    refused = launch(run_dir, BASE + data_overrides(data), nproc=1)
    assert refused.codes == [2] and "data: checkpoint 'ffff" in refused.logs[0], refused.explain()
    resumed = launch(run_dir, BASE + [f"data.dir={converted}", f"data.tokenizer={data / 'tokenizer'}"], nproc=1)
    assert resumed.codes == [0], resumed.explain()
    assert "resumed from step-000004 at step 4" in resumed.logs[0]
    after = {step: loss for step, loss in resumed.losses().items() if step > 4}    # (steps 1-4: the copied log)
    assert after == {step: loss for step, loss in straight.losses().items() if step > 4} and sorted(after) == [5, 6]
