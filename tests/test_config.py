from dataclasses import dataclass, fields

import pytest

from shared.config import ConfigError, knob


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
