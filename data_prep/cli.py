"""`python -m data_prep SUBCOMMAND ...`: a thin dispatcher.

Each subcommand is a module ``data_prep/commands/<name>.py`` defining ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.  data_prep imports nothing from pretrain.
"""
from __future__ import annotations

import argparse
import importlib
import sys

PLANNED = ["vocab", "shards", "run", "verify", "stats", "inspect", "merge"]


def _commands() -> dict:
    found = {}
    for name in PLANNED:
        try:
            found[name] = importlib.import_module(f"data_prep.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("data_prep.commands"):
                continue
            raise
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep",
                                     description="Offline stages: corpora to sharded WebDataset tarballs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _commands().items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "__doc__", None) or module.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
