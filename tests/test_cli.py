"""The ``lln`` command table: every command parses, and a missing optional extra is reported."""

from __future__ import annotations

import pytest

from lln import cli


def test_every_command_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    listed = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in listed


def test_command_with_missing_extra_is_listed_and_fails_clearly(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "lln.no_such_module_for_test")
    with pytest.raises(SystemExit) as exc:
        cli.main(["ghost", "--any", "option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lln ghost: error:" in err and "no_such_module_for_test" in err


def test_bad_option_value_is_one_line_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--methods", "not_an_attention", "--lengths", "64", "--out", "/tmp/x"])
    assert exc.value.code == 2
    assert "not_an_attention" in capsys.readouterr().err
