"""A fine-tuning suite: several tasks, one table (`python -m pretrain finetune --suite FILE`).

The suite file is YAML: ``tasks:`` a list of ``{name, config, overrides}`` entries, ``config`` a
fine-tuning YAML (relative to the suite file, as ``base:`` is) and ``overrides`` a list of
``section.key=value`` laid over it.  Each task is run by the fine-tuning entry point; this module reads
the suite and turns the tasks' metrics.json summaries into one table: each task's main metric (the one
that picks its best model), its mean, std and per-seed values, and the average of the tasks' means.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import yaml

SUITE_JSON, SUITE_MD = "suite.json", "suite.md"
ENTRY_KEYS = ("name", "config", "overrides")


class SuiteError(ValueError):
    """A suite file that cannot be run; the message names the file and the entry, one line a problem."""


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    name: str
    """Task name: its directory under the suite's output directory and its row in the table."""
    config: str
    """The task's fine-tuning YAML (resolved against the suite file's directory)."""
    overrides: tuple[str, ...] = ()
    """``section.key=value`` overrides laid over ``config``."""


def load_suite(path: str) -> list[SuiteTask]:
    """The tasks of suite file ``path`` (or a shipped suite's name, ``finetune/glue``: data_prep.settings.config_path),
    every problem reported at once (SuiteError)."""
    from data_prep.settings import config_path
    path = config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise SuiteError(f"{path}: cannot read the suite file ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or "tasks" not in data:
        raise SuiteError(f"{path}: missing `tasks` (a list of {{name, config, overrides}} entries)")
    extra = sorted(set(data) - {"tasks"})
    entries = data["tasks"]
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{path}: `tasks` must be a non-empty list of {{name, config, overrides}} entries")
    problems = [f"{path}: unknown key(s) {', '.join(map(repr, extra))} (allowed: tasks)"] if extra else []
    tasks, seen = [], {}
    for i, entry in enumerate(entries):
        where = f"{path}: tasks[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with name and config, got {entry!r}")
            continue
        name, config, overrides = entry.get("name"), entry.get("config"), entry.get("overrides") or []
        if isinstance(name, str) and name:
            where += f" ({name})"
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        bad = [f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(ENTRY_KEYS)})"] if unknown else []
        if not isinstance(name, str) or not name:
            bad.append("missing `name`")
        elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            bad.append(f"name {name!r} must be a plain directory name (letters, digits, . _ -)")
        elif name in seen:
            bad.append(f"duplicate name {name!r} (also tasks[{seen[name]}])")
        else:
            seen[name] = i
        if not isinstance(config, str) or not config:
            bad.append("missing `config` (a fine-tuning YAML)")
        else:
            config = os.path.join(os.path.dirname(path), os.path.expanduser(config))
            if not os.path.isfile(config):
                bad.append(f"config {config} does not exist")
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            bad.append(f"overrides must be a list of section.key=value strings, got {overrides!r}")
        problems += [f"{where}: {b}" for b in bad]
        if not bad:
            tasks.append(SuiteTask(name, config, tuple(overrides)))
    if problems:
        raise SuiteError("\n".join(problems))
    return tasks


def suite_configs(path: str, overrides: list[str], flags: dict, out: str, world_size: int | None = None) -> dict:
    """{task name: its validated fine-tuning config} of suite file ``path``: each task's config < its own
    overrides < ``overrides`` < ``flags`` (dotted keys), run in OUT/NAME; every problem of the file and
    of the tasks' configs raised together as one SuiteError, one line a problem."""
    from data_prep.settings import ConfigError
    from pretrain.finetune.config import load_finetune_config

    configs, problems = {}, []
    for i, task in enumerate(load_suite(path)):
        try:
            configs[task.name] = load_finetune_config(
                task.config, [*task.overrides, *overrides], {**flags, "logging.run_dir": os.path.join(out, task.name)},
                world_size=world_size)
        except ConfigError as err:
            problems += [f"{path}: tasks[{i}] ({task.name}): {err.source or task.config}: {problem}"
                         for problem in err.problems]
    if problems:
        raise SuiteError("\n".join(problems))
    return configs


def suite_table(summaries: dict[str, dict]) -> dict:
    """{task name: its metrics.json summary} -> suite.json: per task the main metric, its mean, std and
    seeds' values; the average of the tasks' main-metric means (each as its task reports it)."""
    tasks = {}
    for name, s in summaries.items():
        metric = s["metric"]
        tasks[name] = {"task": s["task"], "metric": metric, "mean": s["mean"][metric], "std": s["std"][metric],
                       "seeds": {seed: values[metric] for seed, values in s["seeds"].items()}}
    average = sum(t["mean"] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "average": average}


def format_table(table: dict) -> str:
    """suite.json as a markdown table: task, metric, mean ± std, seeds; the last row the average."""
    rows = ["| task | metric | mean ± std | seeds |", "|---|---|---|---|"]
    for name, t in table["tasks"].items():
        seeds = ", ".join(f"{seed}: {v:.4f}" for seed, v in t["seeds"].items())
        rows.append(f"| {name} | {t['metric']} | {t['mean']:.4f} ± {t['std']:.4f} | {seeds} |")
    rows.append(f"| average | (of the means) | {table['average']:.4f} | |")
    return "\n".join(rows) + "\n"


def write_suite(out_dir: str, table: dict) -> None:
    """OUT/suite.json and OUT/suite.md, each written atomically."""
    from pretrain.weights import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    for name, text in ((SUITE_JSON, json.dumps(table, indent=2) + "\n"), (SUITE_MD, format_table(table))):
        atomic_write_text(os.path.join(out_dir, name), text)
