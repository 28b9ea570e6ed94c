"""`python -m pretrain SUBCOMMAND ...`: a thin dispatcher.

Each subcommand is a module ``pretrain/commands/<name>.py`` defining ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Modules import heavy libraries (torch,
deepspeed) inside ``run`` so that ``--help`` stays fast.  Only modules that exist are listed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order shown in --help.  A name whose module does not exist yet is simply not offered.
PLANNED = ["train", "eval", "export", "import", "bench", "demo", "config"]


def available_commands(package: str, planned: list[str]) -> dict:
    found = {}
    for name in planned:
        module_name = f"{package}.commands.{name.replace('-', '_')}" + ("_" if name == "import" else "")
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(f"{package}.commands"):
                continue
            raise
    return found


def build_parser(prog: str, description: str, package: str, planned: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in available_commands(package, planned).items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "__doc__", None) or module.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m pretrain", "Pretrain BERT-family encoders on DeepSpeed ZeRO.",
                          "pretrain", PLANNED)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
