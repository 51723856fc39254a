"""The CLI's error handling: user errors as one line (exit 2), bugs with their traceback, LMJAX_DEBUG, and
`--config.KEY=VALUE` refused by the commands that build no config."""

import pytest

from lmjax import cli
from lmjax.cli import parser
from lmjax.config import ConfigError, DataError

UNKNOWN_KNOB = ["data", "prepare", "--out", "never-written", "--config.no_such_knob=1"]


@pytest.mark.parametrize("debug", [None, "0"])
def test_user_error_is_one_line_and_exit_2(debug, monkeypatch, capsys):
    if debug is None:
        monkeypatch.delenv("LMJAX_DEBUG", raising=False)
    else:
        monkeypatch.setenv("LMJAX_DEBUG", debug)
    assert cli.main(UNKNOWN_KNOB) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error: ") and "no_such_knob" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_data_error_from_a_subcommand_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LMJAX_DEBUG", raising=False)
    assert cli.main(["data", "prepare", "--out", str(tmp_path), "--config.sources=nosuchkind:x"]) == 2
    assert capsys.readouterr().err.startswith("lmjax: error: bad data source 'nosuchkind:x'")


def test_programming_error_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.delenv("LMJAX_DEBUG", raising=False)

    def broken(args):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(parser, "cmd_data_prepare", broken)
    with pytest.raises(ValueError, match="could not be broadcast") as err:
        cli.main(["data", "prepare", "--out", "never-written"])
    assert not isinstance(err.value, DataError)
    assert err.traceback[-1].name == "broken"
    assert "lmjax: error" not in capsys.readouterr().err


def test_debug_env_shows_the_traceback_of_user_errors(monkeypatch, capsys):
    monkeypatch.setenv("LMJAX_DEBUG", "1")
    with pytest.raises(ConfigError, match="no_such_knob") as err:
        cli.main(UNKNOWN_KNOB)
    assert len(err.traceback) > 1
    assert "lmjax: error" not in capsys.readouterr().err


@pytest.mark.parametrize("command, flags", [("eval safety", ["--workdir", "never-read"]),
                                           ("sample", ["--workdir", "never-read"]),
                                           ("feedback export", ["--workdir", "never-read", "--out", "never-written"])])
def test_commands_that_build_no_config_refuse_overrides(command, flags, monkeypatch, capsys):
    monkeypatch.delenv("LMJAX_DEBUG", raising=False)
    assert cli.main([*command.split(), *flags, "--config.train.lr=1"]) == 2
    assert capsys.readouterr().err == (f"lmjax: error: lmjax {command} takes no --config overrides "
                                       "(got --config.train.lr=1)\n")


def test_commands_that_build_a_config_get_the_overrides(monkeypatch):
    seen = []
    monkeypatch.setattr(parser, "cmd_plan", lambda args: seen.append(args.overrides))
    assert cli.main(["plan", "--config", "configs/tiny.py", "--config.train.lr=1", "--config.model.d_model", "64"]) == 0
    assert seen == [["train.lr=1", "model.d_model=64"]]
