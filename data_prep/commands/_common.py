"""Helpers shared by the subcommands: config flags, SLURM node slices, error reporting."""
from __future__ import annotations

import argparse
import functools
import signal
import sys
import typing

from data_prep import settings
from data_prep.config import PrepConfig, load_config, slurm_node_slice
from data_prep.errors import PrepError, Stopped


def flags_of(key: settings.Key) -> dict[str, object]:
    """{flag: the value it stores, or None for a flag that takes a value} of a config key: the
    ``flags`` given on its field, else ``--LEAF-NAME``, and ``--no-LEAF-NAME`` for a boolean whose
    default is true."""
    given = key.field.metadata.get("flags")
    if isinstance(given, dict):
        return given
    leaf = key.dotted.rsplit(".", 1)[-1].replace("_", "-")
    if key.type is bool:
        return {given or (f"--no-{leaf}" if key.default else f"--{leaf}"): not key.default}
    return {given or f"--{leaf}": None}


def _selected(dotted: str, include: tuple[str, ...] | None) -> bool:
    """Whether ``include`` (sections, keys; "" = the top-level keys) names key ``dotted``."""
    return include is None or any(dotted == p or dotted.startswith(p + ".") or (p == "" and "." not in dotted)
                                  for p in include)


def add_config_flags(parser: argparse.ArgumentParser, include: tuple[str, ...] | None = None,
                     required: tuple[str, ...] = ()) -> None:
    """The flags of the config keys ``include`` names (all when None), and ``section.key=value``
    arguments.  Help comes from the field docstrings; ``required`` keys must be given as flags.

    Defaults are left out (argparse.SUPPRESS): a flag given overrides the config, one not given
    leaves the config file's value or the built-in default.
    """
    for dotted, key in settings.keys(PrepConfig).items():
        if not _selected(dotted, include):
            continue
        flags = flags_of(key)
        group = parser.add_mutually_exclusive_group() if len(flags) > 1 else parser
        for flag, const in flags.items():
            kwargs = dict(dest=dotted, default=argparse.SUPPRESS, help=f"{key.doc} [{dotted}]")
            if const is not None:
                kwargs["help"] = f"{dotted}={str(const).lower()}: {key.doc}"
                group.add_argument(flag, action="store_const", const=const, **kwargs)
                continue
            kind, _ = settings.unwrap_optional(key.type)
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
            if typing.get_origin(kind) is list:
                kwargs.update(nargs="+", metavar="PATH")
            elif typing.get_origin(kind) is typing.Literal:
                choices = typing.get_args(kind)
                kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
            elif kind in (int, float):
                kwargs["type"] = kind
            group.add_argument(flag, required=dotted in required, **kwargs)
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help="any config key (top-level keys: key=value), applied after the flags; "
                             "give them together, before --input or after --")


def given_flags(args: argparse.Namespace) -> dict:
    """{dotted key: value} of the config flags present on the command line."""
    known = settings.keys(PrepConfig)
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in known}


def config_from_args(args: argparse.Namespace, path=None) -> PrepConfig:
    """The config of a command: a SLURM job array's node slice < YAML ``path`` < its flags < its
    ``section.key=value`` arguments."""
    found = slurm_node_slice()
    cfg = load_config(path, given_flags(args), args.overrides,
                      environment={"num_nodes": found[0], "node_rank": found[1]} if found else None)
    if found and (cfg.num_nodes, cfg.node_rank) == found:
        print(f"data_prep: SLURM job array: node {found[1]} of {found[0]}", file=sys.stderr)
    return cfg


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def reports_errors(run):
    """PrepError -> 'error: ...' on stderr and exit status 1 (2 for a directory in use), no traceback
    for user mistakes; Ctrl-C and SIGTERM stop the run (and its workers) with status 128 + signal."""
    @functools.wraps(run)
    def wrapper(args) -> int:
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        try:
            return int(run(args) or 0)
        except PrepError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_status
        except (KeyboardInterrupt, Stopped) as err:
            signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(f"{what}: finished shards are kept; rerun the same command to resume", file=sys.stderr)
            return 128 + signum
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapper
