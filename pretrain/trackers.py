"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (``logging.trackers``).

MetricsLogger (pretrain/metrics.py) opens them on rank 0 and forwards what it logs: every scalar at its
step (the values TensorBoard gets), and at each start of the run the resolved config and the run's
metadata.  Off unless named in ``logging.trackers``; the packages are the optional extra
``bertforge[trackers]``, imported only when a tracker opens.  A setting left at None leaves the choice to
the package, its environment variables included (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_MODE,
WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR).

Resume: the trackers' run ids are kept in RUN_DIR/trackers.json.  A run that resumes from a checkpoint
(start step > 0) continues those tracker runs; one that starts at step 0 opens new ones.  Neither package
can delete logged points, so steps logged after the last checkpoint by a run cut short stay there and the
resumed run logs them again: a tracker shows those steps twice (metrics.jsonl and TensorBoard keep the
resumed run's values only).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import re
from typing import Callable, Optional

from pretrain.config import flatten
from pretrain.weights import atomic_write_text

# tracker name -> the module it needs
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
INSTALL_HINT = "pip install 'bertforge[trackers]'"
IDS_FILE = "trackers.json"
STEP_KEY = "step"      # W&B: the x-axis of every scalar (logged beside them), so late rows keep their step
MLFLOW_NOT_IN_KEYS = re.compile(r"[^\w\-. :/]")   # what MLflow refuses in a metric name


class TrackerError(RuntimeError):
    """A tracker that cannot start (package missing, store unreachable, not logged in): one line."""


def config_problems(names: list[str]) -> list[str]:
    """The problems of ``logging.trackers`` in any config: unknown or repeated names."""
    problems = []
    for name in names:
        if name not in PACKAGES:
            close = difflib.get_close_matches(name, list(PACKAGES), n=1)
            problems.append(f"logging.trackers: unknown tracker {name!r}, expected any of "
                            f"{', '.join(map(repr, PACKAGES))}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    problems += [f"logging.trackers: {name!r} is listed twice" for name in sorted(set(names)) if names.count(name) > 1]
    return problems


def missing_packages(names: list[str]) -> list[str]:
    """One line per named tracker whose package is not installed (found without importing it).  Checked by
    the commands that run (train, config, finetune) once their config is loaded, not by every load: a
    checkpoint's config.yaml naming a tracker must still load where the package is absent (export, eval)."""
    return [_not_installed(name) for name in names
            if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]


def _not_installed(name: str) -> str:
    return f"logging.trackers: {name} is not installed ({INSTALL_HINT})"


def _import(name: str):
    try:
        return importlib.import_module(PACKAGES[name])
    except ImportError:
        raise TrackerError(_not_installed(name)) from None


def run_name(section, run_dir: str) -> str:
    """``logging.tracker_run_name``, else the name of ``logging.run_dir``; with the path of ``run_dir``
    below it when the logger writes to a subdirectory (fine-tuning's ``NAME/seed-1``)."""
    root = os.path.abspath(section.run_dir)
    name = section.tracker_run_name or os.path.basename(root)
    below = os.path.relpath(os.path.abspath(run_dir), root)
    return name if below == "." else f"{name}/{below}"


def open_trackers(section, run_dir: str, start_step: int, say: Callable[[str], None]) -> list:
    """The trackers ``section.trackers`` names, started (continuing the runs in RUN_DIR/trackers.json
    when ``start_step`` > 0), their run ids written back there."""
    if not section.trackers:
        return []
    path = os.path.join(run_dir, IDS_FILE)
    ids = {}
    if start_step > 0 and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                ids = json.load(f)
        except ValueError as err:
            raise TrackerError(f"{path}: not the JSON of tracker run ids this run writes ({err}); remove it to "
                               f"start new tracker runs") from None
        if not isinstance(ids, dict):
            raise TrackerError(f"{path}: expected a JSON object {{tracker: run id}}, got {type(ids).__name__}")
    name = run_name(section, run_dir)
    opened = []
    try:
        for tracker in section.trackers:
            kind = {"mlflow": MlflowTracker, "wandb": WandbTracker}[tracker]
            try:
                opened.append(kind(section, name, ids.get(tracker), say))
            except TrackerError:
                raise
            except Exception as err:     # e.g. a protobuf version the package cannot import with
                detail = (str(err).strip().splitlines() or [""])[0]
                raise TrackerError(f"logging.trackers: {tracker} cannot start: {type(err).__name__}: {detail}") from err
    except BaseException:
        for t in opened:
            t.close()
        raise
    atomic_write_text(path, json.dumps({t.name: t.run_id for t in opened}, indent=2) + "\n")
    return opened


def _text(value) -> str:
    """A config value as an MLflow param or tag: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class _Tracker:
    """What the trackers share: a failure once the run has started (a server gone, a disk full) is said once
    and ends the logging to that tracker, not the training."""
    name: str
    errors: tuple
    """The exceptions a failure to send raises."""

    def _guarded(self, what: str, send: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            send()
        except self.errors as err:
            self.failed = True
            self.say(f"{self.name}: {what} failed ({str(err).strip().splitlines()[0]}); it gets nothing more from "
                     f"this run (metrics.jsonl and TensorBoard have it all)")


class MlflowTracker(_Tracker):
    """One MLflow run, through MlflowClient (no process-wide active run or URI is set): scalars as metrics
    at their step, the config as params (``model.hidden_size``), the metadata as tags (``run.git``,
    ``run.versions.torch``).  Params cannot change once logged: a key whose value differs at a later start
    keeps its first value and gets the tag ``config.KEY`` holding the latest one.  A character MLflow refuses
    in a metric name (a source named ``web+news``) becomes ``_``.  A failure once the run has started (the
    server gone) is said once and ends the logging to MLflow, not the training."""
    name = "mlflow"

    def __init__(self, section, run_name: str, run_id: Optional[str], say: Callable[[str], None]):
        mlflow = _import("mlflow")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
        from mlflow.exceptions import MlflowException
        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.errors, self.say, self.failed = (MlflowException, OSError), say, False
        where = section.mlflow_tracking_uri or mlflow.get_tracking_uri()
        try:
            self.client = mlflow.MlflowClient(tracking_uri=section.mlflow_tracking_uri)
            if run_id is not None and not self._exists(run_id, MlflowException):
                say(f"mlflow: run {run_id} (RUN_DIR/{IDS_FILE}) is not in {where}; starting a new run")
                run_id = None
            if run_id is None:
                name = section.mlflow_experiment or MLFLOW_EXPERIMENT_NAME.get()
                found = self.client.get_experiment_by_name(name) if name else None
                experiment = (found.experiment_id if found else self.client.create_experiment(name)) if name \
                    else MLFLOW_EXPERIMENT_ID.get() or "0"          # "0": MLflow's Default experiment
                run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except (MlflowException, OSError) as err:
            sql = where.split(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql") \
                and importlib.util.find_spec("sqlalchemy") is None
            raise TrackerError(f"logging.mlflow_tracking_uri: MLflow cannot start a run at {where}: "
                               f"{str(err).strip().splitlines()[0]}" + (
                                   " (a database store needs the full package: pip install mlflow; or set "
                                   "logging.mlflow_tracking_uri to a server)" if sql else "")) from None
        self.run_id = run_id

    def _exists(self, run_id: str, mlflow_error: type) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except mlflow_error as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":     # the store unreachable: not a missing run
                raise
            return False

    def log(self, step: int, scalars: dict, when: float) -> None:
        metrics = [self.Metric(MLFLOW_NOT_IN_KEYS.sub("_", k), float(v), int(when * 1000), step)
                   for k, v in scalars.items()]
        self._guarded(f"logging step {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_run(self, config: dict, meta: dict) -> None:
        def send():
            params = {k: _text(v) for k, v in flatten(config).items()}
            logged = self.client.get_run(self.run_id).data.params
            changed = {f"config.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
            tags = {**{f"run.{k}": _text(v) for k, v in flatten(meta).items()}, **changed}
            self.client.log_batch(self.run_id, params=[self.Param(k, v) for k, v in params.items() if k not in logged],
                                  tags=[self.RunTag(k, v) for k, v in tags.items()])
        self._guarded("logging the config", send)

    def close(self) -> None:
        self._guarded("ending the run", lambda: self.client.set_terminated(self.run_id))


class WandbTracker(_Tracker):
    """One W&B run: scalars with ``step`` beside them as their x-axis (W&B's own step only grows, so a
    row logged late, a downstream score at its checkpoint's step, would be dropped), the config as the
    run's config with the metadata under ``run_metadata``.  W&B's capture of stdout/stderr is off (the
    job's own log keeps them)."""
    name = "wandb"

    def __init__(self, section, run_name: str, run_id: Optional[str], say: Callable[[str], None]):
        wandb = _import("wandb")
        self.errors, self.say, self.failed = (wandb.Error, OSError), say, False
        try:
            self.run = wandb.init(project=section.wandb_project, entity=section.wandb_entity,
                                  mode=section.wandb_mode, name=run_name, id=run_id,
                                  resume="allow" if run_id else None, settings=wandb.Settings(console="off"))
        except wandb.Error as err:
            raise TrackerError(f"logging.trackers: W&B cannot start a run: {str(err).strip().splitlines()[0]} "
                               f"(logging.wandb_mode=offline or WANDB_MODE=offline logs without an account)") from None
        self.run_id = self.run.id
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def log(self, step: int, scalars: dict, when: float) -> None:
        self._guarded(f"logging step {step}", lambda: self.run.log({STEP_KEY: step, **scalars}))

    def log_run(self, config: dict, meta: dict) -> None:
        self._guarded("logging the config", lambda: self.run.config.update({**config, "run_metadata": meta},
                                                                           allow_val_change=True))

    def close(self) -> None:
        self._guarded("ending the run", self.run.finish)
