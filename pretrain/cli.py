"""`python -m pretrain SUBCOMMAND ...`: the commands of ``pretrain/commands/``, dispatched by
:func:`data_prep.cli.dispatch` (one dispatcher for both packages; see its module docstring).
"""
from __future__ import annotations

import sys

from data_prep.cli import dispatch

# in the order --help shows them
COMMANDS = ("train", "distill", "finetune", "eval", "export", "import", "bench", "demo", "config")


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m pretrain", "Pretrain BERT-family encoders on DeepSpeed ZeRO.",
                    "pretrain", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
