"""Helpers shared by the subcommands: config flags, SLURM node slices, error reporting."""
from __future__ import annotations

import argparse
import functools
import signal
import sys

from data_prep.config import CHOICES, CLI_OPTIONS, config_from_flat, section_keys, slurm_node_slice
from data_prep.errors import PrepError, Stopped

BOOL_FLAGS = {"--no-dedup": False, "--whole-word-mask": True}


def add_config_flags(parser: argparse.ArgumentParser, keys_prefixes: tuple[str, ...] | None = None) -> None:
    """Flags of CLI_OPTIONS (optionally only those whose key starts with one of ``keys_prefixes``).

    Defaults are left out (argparse.SUPPRESS): a flag given overrides the config, one not given
    leaves the config file's value or the built-in default.
    """
    types = section_keys()
    for flag, key, help_text in CLI_OPTIONS:
        if keys_prefixes and not key.startswith(keys_prefixes):
            continue
        kwargs = dict(dest=key, default=argparse.SUPPRESS, help=help_text,
                      metavar=flag.lstrip("-").upper().replace("-", "_"))
        if flag in BOOL_FLAGS:
            parser.add_argument(flag, action="store_const", const=BOOL_FLAGS[flag], **kwargs)
            continue
        kind = types[key]
        if key == "input.paths":
            kwargs.update(nargs="+", metavar="PATH")
        elif kind in (int, float):
            kwargs.update(type=kind)
        if key in CHOICES:
            kwargs.update(choices=CHOICES[key], metavar="{" + ",".join(CHOICES[key]) + "}")
        parser.add_argument(flag, **kwargs)


def given_flags(args: argparse.Namespace) -> dict:
    """{dotted key: value} of the config flags present on the command line."""
    keys = {key for _, key, _ in CLI_OPTIONS}
    flat = {k: v for k, v in vars(args).items() if k in keys}
    if "input.paths" in flat:
        flat["input.paths"] = list(flat["input.paths"])
    return flat


def with_node_slice(flat: dict) -> dict:
    """Fill num_nodes/node_rank from a SLURM job array when the flags do not set them."""
    if "num_nodes" not in flat and "node_rank" not in flat:
        found = slurm_node_slice()
        if found:
            flat["num_nodes"], flat["node_rank"] = found
            print(f"data_prep: SLURM job array: node {found[1]} of {found[0]}", file=sys.stderr)
    return flat


def build_config(flat: dict, source: str = "the command line"):
    return config_from_flat(flat, source)


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
