"""The dispatcher both packages share (data_prep.cli.dispatch): lazy, and loud when a command breaks."""
from __future__ import annotations

import sys
import textwrap

import pytest

from data_prep import cli as data_prep_cli
from data_prep.cli import dispatch
from pretrain import cli as pretrain_cli

COMMAND = textwrap.dedent('''
    """{name}: the long description."""
    {imports}
    HELP = "{name} help"

    def add_arguments(parser):
        parser.add_argument("--n", type=int, default=1)
        parser.add_argument("overrides", nargs="*")

    def run(args):
        print("{name} ran", args.n, *args.overrides)
        return 0
''')


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package `fakecli` with commands ok, import (import_.py) and broken."""
    commands = tmp_path / "fakecli" / "commands"
    commands.mkdir(parents=True)
    (tmp_path / "fakecli" / "__init__.py").write_text("__version__ = \"9.9\"\n")
    (commands / "__init__.py").write_text("")
    for name, module, imports in [("ok", "ok", ""), ("import", "import_", ""),
                                  ("broken", "broken", "import no_such_library_xyz")]:
        (commands / f"{module}.py").write_text(COMMAND.format(name=name, imports=imports))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakecli"
    for name in [m for m in sys.modules if m.startswith("fakecli")]:
        del sys.modules[name]


def test_a_named_command_imports_only_its_own_module(package, capsys):
    assert dispatch("prog", "d", package, ("ok", "import", "broken"), ["ok", "--n", "3"]) == 0
    assert capsys.readouterr().out == "ok ran 3\n"
    assert dispatch("prog", "d", package, ("ok", "import", "broken"), ["import"]) == 0   # import_.py
    assert "fakecli.commands.broken" not in sys.modules


def test_flags_may_follow_the_positional_overrides(package, capsys):
    """`train a=1 --out D b=2`, as users type it after pasting an override."""
    assert dispatch("prog", "d", package, ("ok",), ["ok", "a=1", "--n", "3", "b=2"]) == 0
    assert capsys.readouterr().out == "ok ran 3 a=1 b=2\n"
    with pytest.raises(SystemExit):
        dispatch("prog", "d", package, ("ok",), ["ok", "a=1", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_dotted_flags_are_overrides(package, capsys):
    """`--training.max_steps 10` and `--zero.stage=2` (torchtitan's and litgpt's habit) mean key=value."""
    argv = ["ok", "--training.max_steps", "10", "--n", "2", "--zero.stage=2", "a=1"]
    assert dispatch("prog", "d", package, ("ok",), argv) == 0
    assert capsys.readouterr().out == "ok ran 2 training.max_steps=10 zero.stage=2 a=1\n"
    with pytest.raises(SystemExit):
        dispatch("prog", "d", package, ("ok",), ["ok", "--training.max_steps"])
    assert "unrecognized arguments: --training.max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("cli,script", [(data_prep_cli, "bertforge-data-prep"), (pretrain_cli, "bertforge-pretrain")])
def test_version_and_the_console_scripts_name(cli, script, capsys, monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--version"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{script} (bertforge) {importlib.metadata.version('bertforge')}\n"
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith(f"usage: {script} ")


def test_a_command_whose_import_breaks_fails_loudly(package):
    with pytest.raises(ModuleNotFoundError, match="no_such_library_xyz"):
        dispatch("prog", "d", package, ("ok", "broken"), ["--help"])
    with pytest.raises(ModuleNotFoundError, match="fakecli.commands.missing"):
        dispatch("prog", "d", package, ("ok", "missing"), [])


def test_help_lists_every_command_and_no_command_prints_it(package, capsys):
    assert dispatch("prog", "d", package, ("ok", "import"), []) == 2
    out = capsys.readouterr().out
    assert "ok help" in out and "import help" in out
    with pytest.raises(SystemExit):
        dispatch("prog", "d", package, ("ok", "import"), ["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("cli", [data_prep_cli, pretrain_cli])
def test_both_packages_offer_every_command(cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in cli.COMMANDS)
