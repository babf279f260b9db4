"""Settings with their own explanation, and the error that names a bad one.

Every configuration dataclass of the book (chapter 3's `GPTConfig`, chapter 4's `TrainConfig`, chapter 6's
`LlamaConfig`) declares its fields with `knob`, so the command line can offer each field as a flag with a
line of help, and refuses a bad value with `ConfigError`, which names the field (the command line shows it
as `--field-name`).
"""

from __future__ import annotations

from dataclasses import field


def knob(default, help: str, resumable: bool = False):
    """A dataclass field with its one-line description. `resumable` marks a model setting that a resumed
    training run may change (dropout, say); the others fix what the checkpoint's weights mean."""
    return field(default=default, metadata={"help": help, "resumable": resumable})


class ConfigError(ValueError):
    """A setting that cannot work. `field` names it; `message` says why, in the caller's terms."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
