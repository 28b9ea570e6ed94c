"""`python -m data_prep SUBCOMMAND ...`, and the dispatcher both packages' entry points share.

Each subcommand is a module ``<package>/commands/<name>.py`` (``import_.py`` for a name that is a
Python keyword) defining ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules import heavy libraries (torch, deepspeed) inside ``run``, and the dispatcher imports
only the module of the command that runs, so ``--help`` stays fast.  A command module that fails
to import is an error, never a command that silently disappears from ``--help``.
data_prep imports nothing from pretrain; ``pretrain.cli`` calls :func:`dispatch`.
"""
from __future__ import annotations

import argparse
import importlib
import keyword
import os
import sys

COMMANDS = ("vocab", "shards", "run", "verify", "stats", "inspect", "merge", "convert")   # order shown in --help


def _command_module(package: str, name: str):
    return importlib.import_module(f"{package}.commands.{name}{'_' if keyword.iskeyword(name) else ''}")


def dotted_flags(argv: list[str]) -> list[str]:
    """``--section.key=value`` and ``--section.key value`` (the torchtitan / litgpt habit) as the
    ``section.key=value`` overrides they mean; no real flag has a dot in its name."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        name = item[2:].partition("=")[0]
        if item.startswith("--") and "." in name and not name.startswith("."):
            if "=" in item:
                out.append(item[2:])
            elif i + 1 < len(argv):
                out.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                out.append(item)        # no value: argparse names it
        else:
            out.append(item)
        i += 1
    return out


def dispatch(prog: str, description: str, package: str, commands: tuple[str, ...],
             argv: list[str] | None = None) -> int:
    """Parse ``argv`` against ``commands`` (modules of ``package.commands``) and run the chosen one.
    Run as a console script (``bertforge-pretrain``), the usage lines name the script."""
    if argv is None:
        argv = sys.argv[1:]
        script = os.path.basename(sys.argv[0])
        prog = script if script.startswith("bertforge-") else prog
    # `prog NAME ...` needs NAME's module only; anything else (--help, a typo) lists every command.
    chosen = argv[:1] if argv[:1] and argv[0] in commands else commands
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s (bertforge) {importlib.import_module(package).__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in chosen:
        module = _command_module(package, name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__ or module.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    if chosen is commands:
        args = parser.parse_args(argv)
    else:   # flags may follow the positional key=value overrides: `train key=value --out DIR`
        args = p.parse_intermixed_args(dotted_flags(argv[1:]))
        args.command = argv[0]
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m data_prep", "Offline stages: corpora to sharded WebDataset tarballs.",
                    "data_prep", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
