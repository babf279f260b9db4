"""Settings with their own explanation, and the error that names a bad one.

Every configuration dataclass of the book (chapter 3's `GPTConfig`, chapter 4's `TrainConfig`, chapter 6's
`LlamaConfig`) declares its fields with `knob`, so the command line can offer each field as a flag with a
line of help, and refuses a bad value with `ConfigError`, which names the field (the command line shows it
as `--field-name`). `add_flag` is that flag: the command lines of chapters 4 and 5 build their parsers with it.
`BriefParser` is their argument parser: a mistake costs one line and a hint, not the whole usage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field, field


def knob(default, help: str, resumable: bool = False):
    """A dataclass field with its one-line description. `resumable` marks a model setting that a resumed
    training run may change (dropout, say); the others fix what the checkpoint's weights mean."""
    return field(default=default, metadata={"help": help, "resumable": resumable})


class ConfigError(ValueError):
    """A setting that cannot work. `field` names it; `message` says why, in the caller's terms."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def flag(name: str) -> str:
    """The command-line flag of a setting: `n_embd` -> `--n-embd`."""
    return "--" + name.replace("_", "-")


def flag_type(annotation) -> type | None:
    """argparse's type for a field's annotation (bool, int, float or str, optionally `| None`); None for a
    setting no flag can hold (a nested config, a dict)."""
    name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    if name in ("bool", "bool | None"):
        return bool
    for text, kind in (("int", int), ("float", float), ("str", str)):
        if name in (text, f"{text} | None"):
            return kind
    return None


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, setting: Field, default) -> None:
    """Add the flag of a `knob` field to `parser`: its help line with `default` shown, `--x/--no-x` for a bool.
    The flag's default is None, so that a caller can tell a value given on the command line from one left out."""
    kind = flag_type(setting.type)
    if kind is None:
        raise ValueError(f"{setting.name}: a {setting.type} setting cannot be a flag")
    help_text = f"{setting.metadata['help']} (default: {default})"
    if kind is bool:
        parser.add_argument(flag(setting.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        parser.add_argument(flag(setting.name), type=kind, default=None, metavar=setting.name.upper(),
                            help=help_text)


class BriefParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line, then where to find the flags: the usage
    argparse prints first runs to dozens of lines for a parser with a flag per setting, and hides the error.
    Exits with status 2, as argparse does."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags)\n")
        sys.exit(2)
