"""The ``exoalign`` command table: help, unknown commands and the exit-code contract (0 / 2 / 1)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

from exoalign import __version__, cli
from exoalign.errors import ConfigError

EXPECTED = {"demo", "sft", "sample", "rm", "score", "label", "train", "eval", "plot", "bench"}


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"], ["help"]])
def test_help_lists_every_command(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: exoalign <command>")
    for name, (_, desc) in cli.COMMANDS.items():
        assert f"  {name:<7} {desc}" in out


def test_command_table_shape():
    assert set(cli.COMMANDS) >= EXPECTED
    for target, desc in cli.COMMANDS.values():
        module, func = target.split(":")
        assert module.startswith("exoalign.") and func == "main" and desc


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"exoalign {__version__}"


def test_unknown_command_exits_2_with_one_line(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: unknown command 'trian'. Fix: use one of demo, sft"
    )


@pytest.fixture()
def fake_command(monkeypatch):
    """Register ``exoalign fake`` backed by an in-memory module whose ``main`` behaviour the test sets."""
    module = types.ModuleType("exoalign_fake_cmd")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (f"{module.__name__}:main", "test command"))
    importlib.invalidate_caches()
    return module


def test_input_error_becomes_one_line_and_exit_2(fake_command, capsys):
    def main(argv):
        raise ConfigError("must be > 0", file="c.yaml", line=3, field="optim.lr", fix="use 1e-6")

    fake_command.main = main
    assert cli.main(["fake", "--config", "c.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: c.yaml:3: field 'optim.lr': must be > 0. Fix: use 1e-6\n"
    assert captured.out == ""


def test_return_codes_and_argv_are_passed_through(fake_command):
    seen = []
    fake_command.main = lambda argv: seen.append(argv)
    assert cli.main(["fake", "a=1", "--x"]) == 0 and seen == [["a=1", "--x"]]
    fake_command.main = lambda argv: 3
    assert cli.main(["fake"]) == 3


def test_other_exceptions_are_not_swallowed(fake_command):
    """Anything that is not bad input propagates (Python then exits 1 with the traceback)."""

    def main(argv):
        raise RuntimeError("bug")

    fake_command.main = main
    with pytest.raises(RuntimeError):
        cli.main(["fake"])


def test_subprocess_unknown_command_exit_code():
    """The installed entry point path end to end: ``python -m exoalign`` exits 2 on an unknown command."""
    proc = subprocess.run(
        [sys.executable, "-m", "exoalign", "nosuchcommand"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: unknown command 'nosuchcommand'.") and proc.stderr.count("\n") == 1
