"""MLflow and W&B trackers (``logging.trackers``, pretrain/trackers.py), read back with the packages' own
readers, offline: MLflow from a local file store through MlflowClient, W&B from its offline run files
(the .wandb transaction log, parsed below with W&B's own protobuf Record).

Checked: a real training run (`python -m pretrain train`, one rank) logs its config (MLflow params, W&B
config), its metadata and every scalar of metrics.jsonl at its step; a fine-tuning run gives one MLflow
run per seed; a resumed start continues the tracker runs (an extended max_steps: MLflow's param stays, a
tag has the new value), a start at step 0 opens new ones, rank 1 opens none; MLflow metric names,
a store lost mid-run (said once, logging goes on), a server that does not answer; an unknown name is one
line at config time, a missing package one line from `pretrain config` / `finetune` (and at open), while
a config naming it still loads (a checkpoint's); trackers are off by default.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.finetune.test_train import QUICK, assets, classification_files, finetune  # noqa: F401 (a fixture)
from tests.pretrain.training_helpers import REPO, TINY, build_shards, data_overrides, launch
from pretrain.cli import main
from pretrain.config import ConfigError, LoggingConfig, load_config
from pretrain.distributed import free_port
from pretrain.finetune.config import FinetuneLoggingConfig
from pretrain.metrics import MetricsLogger, read_jsonl
from pretrain.signals import STOP_SIGNALS
from pretrain.trackers import TrackerError

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
from mlflow import MlflowClient  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

MISSING = "logging.trackers: {} is not installed (pip install 'bertforge[trackers]')"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("trackers"), "dynamic")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The packages' own environment variables: MLflow at a file store under tmp_path, W&B offline there
    (W&B's process-wide state reads them once: it is torn down around each test)."""
    wandb.teardown()
    env = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "WANDB_SILENT": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    wandb.teardown()


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def as_param(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def scalars(rows: list[dict]) -> list[tuple]:
    """(key, step, value) of every finite number that metrics.jsonl's train/eval rows hold, sorted."""
    return sorted((k, r["step"], float(v)) for r in rows if r["kind"] in ("train", "eval") for k, v in r.items()
                  if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v))


def mlflow_scalars(client: MlflowClient, run_id: str, keys) -> list[tuple]:
    return sorted((k, m.step, m.value) for k in keys for m in client.get_metric_history(run_id, k))


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a LevelDB-style log (a 7-byte file header ":W&B", 0xBEE1,
    version 0; 32 KiB blocks of chunks, each crc32(type + data), length, type: full/first/middle/last)."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                 # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk before byte {pos}"
        pending += chunk
        if kind in (1, 4):                           # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60) -> list:
    """The records of ``path`` once they end with the exit record: W&B's service process writes the file
    and can still be writing it when ``run.finish()`` has returned (seen offline, on a loaded machine)."""
    deadline = time.time() + timeout
    while True:
        try:
            records = list(wandb_records(path))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except AssertionError:                       # a chunk still being written
            if time.time() > deadline:
                raise
        if time.time() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s")
        time.sleep(0.2)


def wandb_history(files: list[Path]) -> tuple[list[tuple], dict, list]:
    """(key, step, value) of every logged scalar (its x-axis "step" logged beside it), the config as its
    updates leave it, and the run records of ``files``."""
    rows, config, runs = [], {}, []
    for path in files:
        for record in finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows += [(k, row["step"], float(v)) for k, v in row.items() if not k.startswith("_") and k != "step"]
            elif kind in ("config", "run"):
                updates = record.config.update if kind == "config" else record.run.config.update
                config.update({k: v for k, v in ((u.key or "/".join(u.nested_key), json.loads(u.value_json))
                                                 for u in updates) if not k.startswith("_")})
                if kind == "run":
                    runs.append(record.run)
    return sorted(rows), config, runs


def test_a_run_logs_its_config_and_every_scalar_to_mlflow_and_wandb(data, tmp_path, offline):
    run = launch(tmp_path / "run", TINY + data_overrides(data) + [
        "logging.trackers=[mlflow,wandb]", "logging.mlflow_experiment=bertforge-test",
        "logging.wandb_project=bertforge-test", "training.max_steps=4", "eval.every_steps=2", "eval.max_batches=2"],
        nproc=1, env=offline)
    assert run.codes == [0], run.explain()
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    (start,) = [r for r in rows if r["kind"] == "run"]
    expected = scalars(rows)
    assert {k for k, _, _ in expected} >= {"train/loss", "train/lr", "perf/seq_per_s", "eval/mlm_loss"}
    assert sorted({s for _, s, _ in expected}) == [0, 1, 2, 3, 4]
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())

    client = MlflowClient(offline["MLFLOW_TRACKING_URI"])
    (found,) = client.search_runs([client.get_experiment_by_name("bertforge-test").experiment_id])
    assert found.info.run_id == ids["mlflow"] and found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params == {k: as_param(v) for k, v in flat(start["config"]).items()}
    assert found.data.tags["run.git"] == start["git"] and found.data.tags["run.world_size"] == "1"
    assert found.data.tags["run.versions.torch"] == start["versions"]["torch"]
    assert mlflow_scalars(client, found.info.run_id, {k for k, _, _ in expected}) == expected
    assert set(found.data.metrics) == {k for k, _, _ in expected}

    files = list(tmp_path.glob("wandb/offline-run-*/*.wandb"))
    assert [f.name for f in files] == [f"run-{ids['wandb']}.wandb"]
    logged, config, runs = wandb_history(files)
    assert logged == expected
    assert [(r.run_id, r.display_name, r.project) for r in runs] == [(ids["wandb"], "run", "bertforge-test")]
    assert config == {**start["config"], "run_metadata": {k: v for k, v in start.items()
                                                          if k not in ("kind", "step", "time", "config")}}


def test_finetuning_logs_one_mlflow_run_per_seed(assets, tmp_path, offline):  # noqa: F811 (the fixture)
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words, n_train=32, n_dev=16)
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        code = finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", tmp_path / "cls", *QUICK,
                        "training.epochs=1", "training.seeds=[1,2]", "eval.every_steps=1",
                        "logging.trackers=[mlflow]", "logging.every_steps=1")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 0
    client = MlflowClient(offline["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs(["0"])}                  # MLflow's Default experiment
    assert sorted(runs) == ["cls/seed-1", "cls/seed-2"]
    for seed in (1, 2):
        rows = read_jsonl(str(tmp_path / "cls" / f"seed-{seed}" / "metrics.jsonl"))
        expected = scalars(rows)
        assert {k for k, _, _ in expected} >= {"train/loss", "dev/accuracy"}
        run = runs[f"cls/seed-{seed}"]
        assert mlflow_scalars(client, run.info.run_id, {k for k, _, _ in expected}) == expected
        (start,) = [r for r in rows if r["kind"] == "run"]
        assert run.data.params == {k: as_param(v) for k, v in flat(start["config"]).items()}
        assert run.data.params["training.seeds"] == "[1, 2]"


def test_a_resumed_run_continues_the_tracker_runs_a_fresh_start_opens_new_ones(tmp_path, offline):
    section = LoggingConfig(run_dir=str(tmp_path / "run"), trackers=["mlflow", "wandb"], tracker_run_name="named")

    def start(step: int, max_steps: int = 10, rank: int = 0) -> dict:
        logger = MetricsLogger(section.run_dir, rank=rank, max_steps=max_steps, start_step=step, tensorboard=False,
                               progress_bar=False, trackers=section)
        logger.log_run(step, {"training": {"max_steps": max_steps, "seed": 1}}, world_size=1)
        logger.log(step + 1, {"train/loss": 1.0 / (step + 1)})
        logger.close()
        return json.loads((tmp_path / "run" / "trackers.json").read_text())

    first = start(0)
    assert start(1, max_steps=20) == first                     # resumed from a checkpoint at step 1, extended
    client = MlflowClient(offline["MLFLOW_TRACKING_URI"])
    run = client.get_run(first["mlflow"])
    assert [(m.step, m.value) for m in client.get_metric_history(first["mlflow"], "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert run.info.run_name == "named" and run.info.status == "FINISHED"
    assert run.data.params == {"training.max_steps": "10", "training.seed": "1"}     # MLflow's params stay
    assert run.data.tags["config.training.max_steps"] == "20"
    files = sorted(tmp_path.glob("wandb/offline-run-*/*.wandb"))
    assert [f.name for f in files] == [f"run-{first['wandb']}.wandb"] * 2
    logged, config, runs = wandb_history(files)
    assert logged == [("train/loss", 1, 1.0), ("train/loss", 2, 0.5)] and config["training"]["max_steps"] == 20
    assert [r.display_name for r in runs] == ["named"] * 2

    again = start(0)                                           # a new run from step 0: new tracker runs
    assert again["mlflow"] != first["mlflow"] and again["wandb"] != first["wandb"]
    start(3, rank=1)                                           # rank 1 logs nowhere
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == again
    assert len(client.search_runs(["0"])) == 2 and len(list(tmp_path.glob("wandb/offline-run-*"))) == 3

    elsewhere = tmp_path / "elsewhere"                         # the stored run is not in this store: a new one
    section.mlflow_tracking_uri, section.trackers = elsewhere.as_uri(), ["mlflow"]
    assert start(1)["mlflow"] != again["mlflow"] and len(MlflowClient(elsewhere.as_uri()).search_runs(["0"])) == 1


def test_a_late_row_keeps_its_step(tmp_path, offline):
    """A downstream score arrives after training has moved on, logged at its checkpoint's step."""
    section = LoggingConfig(run_dir=str(tmp_path / "run"), trackers=["mlflow", "wandb"])
    logger = MetricsLogger(section.run_dir, rank=0, max_steps=10, start_step=0, tensorboard=False,
                           progress_bar=False, trackers=section)
    logger.log(5, {"train/loss": 2.0})
    logger.log(2, {"downstream/average": 0.75}, kind="downstream")
    logger.close()
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    history = MlflowClient(offline["MLFLOW_TRACKING_URI"]).get_metric_history(ids["mlflow"], "downstream/average")
    assert [(m.step, m.value) for m in history] == [(2, 0.75)]
    logged, _, _ = wandb_history(list(tmp_path.glob("wandb/offline-run-*/*.wandb")))
    assert logged == [("downstream/average", 2, 0.75), ("train/loss", 5, 2.0)]


def test_mlflow_names_and_a_store_lost_mid_run(tmp_path, offline, capsys):
    section = LoggingConfig(run_dir=str(tmp_path / "run"), trackers=["mlflow"])
    logger = MetricsLogger(section.run_dir, rank=0, max_steps=10, start_step=0, tensorboard=False,
                           progress_bar=False, trackers=section)
    logger.log(1, {"data/web+news/samples": 8, "train/loss": 2.0})       # "+": not allowed in an MLflow name
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(offline["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).data.metrics == {"data/web_news/samples": 8.0, "train/loss": 2.0}
    shutil.rmtree(tmp_path / "mlruns" / "0" / run_id)                       # the store has lost the run
    for step in (2, 3):
        logger.log(step, {"train/loss": 1.0})
    logger.close()                                                         # training goes on, and ends
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mlflow:")]
    assert len(said) == 1 and said[0].startswith("mlflow: logging step 2 failed (") and said[0].endswith(
        "it gets nothing more from this run (metrics.jsonl and TensorBoard have it all)")
    assert [r["step"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2, 3]


def test_a_wandb_failure_mid_run_is_said_once_and_an_odd_error_at_start_is_one_line(tmp_path, offline, capsys,
                                                                                      monkeypatch):
    section = LoggingConfig(run_dir=str(tmp_path / "run"), trackers=["wandb"])
    logger = MetricsLogger(section.run_dir, rank=0, max_steps=10, start_step=0, tensorboard=False,
                           progress_bar=False, trackers=section)
    (tracker,) = logger.trackers

    def gone(*_, **__):
        raise wandb.Error("the service process went away")
    monkeypatch.setattr(tracker.run, "log", gone)
    for step in (1, 2):
        logger.log(step, {"train/loss": 1.0})
    logger.close()
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wandb:")]
    assert said == ["wandb: logging step 1 failed (the service process went away); it gets nothing more from this "
                    "run (metrics.jsonl and TensorBoard have it all)"]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2]

    import pretrain.trackers as trackers

    def odd(self, *_):
        raise TypeError("Descriptors cannot be created directly.\nIf this call came from a _pb2.py file ...")
    monkeypatch.setattr(trackers.WandbTracker, "__init__", odd)
    with pytest.raises(TrackerError) as err:
        MetricsLogger(str(tmp_path / "other"), rank=0, max_steps=1, start_step=0, tensorboard=False,
                      progress_bar=False, trackers=section)
    assert str(err.value) == "logging.trackers: wandb cannot start: TypeError: Descriptors cannot be created directly."


def test_an_mlflow_server_that_does_not_answer_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"                               # nothing listens there
    section = LoggingConfig(run_dir=str(tmp_path), trackers=["mlflow"], mlflow_tracking_uri=uri)
    with pytest.raises(TrackerError) as err:
        MetricsLogger(str(tmp_path), rank=0, max_steps=1, start_step=0, tensorboard=False, progress_bar=False,
                      trackers=section)
    assert str(err.value).startswith(f"logging.mlflow_tracking_uri: MLflow cannot start a run at {uri}: ")
    assert "\n" not in str(err.value) and not (tmp_path / "trackers.json").exists()


def test_a_tracker_failing_on_rank_0_ends_every_rank_at_once(data, tmp_path):
    """Only rank 0 opens trackers: when one cannot start, the other ranks learn it and exit alike, instead
    of waiting for rank 0 in their next collective (training.collective_timeout_s, 30 min by default)."""
    uri = f"http://127.0.0.1:{free_port()}"                               # nothing listens there
    run = launch(tmp_path / "run", TINY + data_overrides(data) + [
        "logging.trackers=[mlflow]", f"logging.mlflow_tracking_uri={uri}", "training.max_steps=2",
        "training.collective_timeout_s=600"], nproc=2, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, timeout=240)
    assert run.codes == [2, 2], run.explain()
    assert f"MLflow cannot start a run at {uri}: " in run.logs[0]
    assert ("logging: the metrics logger (metrics.jsonl, TensorBoard, logging.trackers) could not start on rank 0 "
            "(its error says why)") in run.logs[1]


@pytest.mark.skipif(importlib.util.find_spec("sqlalchemy") is not None, reason="a full mlflow opens sqlite stores")
def test_a_database_store_without_the_full_mlflow_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"                            # MLflow's default kind of store
    section = LoggingConfig(run_dir=str(tmp_path), trackers=["mlflow"], mlflow_tracking_uri=uri)
    with pytest.raises(TrackerError) as err:
        MetricsLogger(str(tmp_path), rank=0, max_steps=1, start_step=0, tensorboard=False, progress_bar=False,
                      trackers=section)
    assert str(err.value).startswith(f"logging.mlflow_tracking_uri: MLflow cannot start a run at {uri}: ")
    assert str(err.value).endswith("(a database store needs the full package: pip install mlflow; or set "
                                   "logging.mlflow_tracking_uri to a server)")


def test_unknown_or_missing_tracker_is_one_line(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        load_config(None, ["logging.trackers=[mlfow]"])
    assert err.value.problems == ["logging.trackers: unknown tracker 'mlfow', expected any of 'mlflow', 'wandb' "
                                  "(did you mean 'mlflow'?)"]
    root, _, ckpt, words = assets
    train, dev = classification_files(root, words, n_train=32, n_dev=16)
    for name in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)             # as if not installed: its import fails
        assert load_config(None, [f"logging.trackers=[{name}]"]).logging.trackers == [name]   # a checkpoint's loads
        capsys.readouterr()
        assert main(["config", "--config", str(REPO / "configs" / "debug.yaml"), f"logging.trackers=[{name}]"]) == 2
        assert capsys.readouterr().err == f"error: {MISSING.format(name)}\n"
        assert finetune("--checkpoint", ckpt, "--train", train, "--dev", dev, "--out", tmp_path / "ft", *QUICK,
                        f"logging.trackers=[{name}]") == 2
        assert capsys.readouterr().err == f"error: {MISSING.format(name)}\n" and not (tmp_path / "ft").exists()
        section = LoggingConfig(run_dir=str(tmp_path), trackers=[name])   # and where no command checked
        with pytest.raises(TrackerError) as err:
            MetricsLogger(str(tmp_path), rank=0, max_steps=1, start_step=0, tensorboard=False, progress_bar=False,
                          trackers=section)
        assert str(err.value) == MISSING.format(name)


def test_trackers_are_off_by_default(tmp_path):
    assert LoggingConfig().trackers == [] and FinetuneLoggingConfig().trackers == []
    assert load_config(None, []).logging.trackers == []
    logger = MetricsLogger(str(tmp_path), rank=0, max_steps=1, start_step=0, tensorboard=False, progress_bar=False,
                           trackers=LoggingConfig(run_dir=str(tmp_path)))
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert logger.trackers == [] and not (tmp_path / "trackers.json").exists()
