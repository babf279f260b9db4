from dataclasses import dataclass, fields

import pytest

from shared.config import BriefParser, ConfigError, knob


def test_knob_carries_help_and_resumability_and_the_error_names_the_field():
    @dataclass
    class Settings:
        width: int = knob(8, "how wide")
        dropout: float = knob(0.0, "dropout probability", resumable=True)

    width, dropout = fields(Settings)
    assert width.metadata == {"help": "how wide", "resumable": False} and dropout.metadata["resumable"]
    assert Settings().width == 8
    with pytest.raises(ValueError, match="width: must be positive") as info:
        raise ConfigError("width", "must be positive")
    assert info.value.field == "width" and info.value.message == "must be positive"


def test_add_flag_offers_a_knob_on_the_command_line():
    import argparse

    from shared.config import add_flag, flag

    @dataclass
    class Settings:
        n_embd: int = knob(8, "how wide")
        bias: bool = knob(True, "biases")
        init_std: float | None = knob(None, "initial std")
        nested: dict = knob(None, "not a flag")

    parser = argparse.ArgumentParser()
    n_embd, bias, init_std, nested = fields(Settings)
    for setting in (n_embd, bias, init_std):
        add_flag(parser, setting, getattr(Settings(), setting.name))
    assert flag("n_embd") == "--n-embd"
    assert "how wide (default: 8)" in parser.format_help()
    args = parser.parse_args(["--n-embd", "16", "--no-bias"])
    assert (args.n_embd, args.bias, args.init_std) == (16, False, None)       # None: not given
    assert parser.parse_args(["--init-std", "0.5"]).init_std == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--n-embd", "wide"])
    with pytest.raises(ValueError, match="nested: .* cannot be a flag"):
        add_flag(parser, nested, None)


def test_a_command_line_mistake_costs_one_line_and_a_hint(capsys):
    parser = BriefParser(prog="python -m somewhere")
    for name in range(30):                               # a parser with a flag per setting: a long usage
        parser.add_argument(f"--setting-{name}", type=int, default=0)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--setting-3", "three"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["python -m somewhere: error: argument --setting-3: invalid int value: 'three'",
                   "(`python -m somewhere --help` lists the flags)"]
