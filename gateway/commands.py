"""The command line's frame: the table of commands, the options every command has, and
the parser class that gives each option its default in its help.

Nothing here imports Trio, ssl, Prometheus, zstandard or zeroconf: `usbip-gateway --help`
and `usbip-gateway COMMAND --help` for another command stay fast. A command's own module
is imported only when that command is the one given.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import __version__

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# Exit statuses every command keeps to (commands document their own 1, e.g. `policy explain`).
EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed (a drain cut sessions, nothing answered)
EXIT_USAGE = 2  # bad arguments or configuration (as argparse's own errors)
EXIT_UNAVAILABLE = 3  # an address could not be listened on or reached


@dataclass(frozen=True, slots=True)
class Command:
    """A top-level command: its one-line help, and where the function that adds its
    parser lives ("module:function", imported only when the command is used)."""

    help: str
    adder: str

    def add(self, subparsers: Any) -> argparse.ArgumentParser:
        module, _, function = self.adder.partition(":")
        add: Callable[[Any], argparse.ArgumentParser] = getattr(
            importlib.import_module(module), function
        )
        return add(subparsers)


def _switch(action: argparse.Action) -> bool:
    return action.nargs == 0  # store_true, store_const, version, help


class CommandParser(argparse.ArgumentParser):
    """Every parser of the command line: each command, at any depth, answers `--version`,
    `--log-level` and `--log-format`, and every option's help ends with its default.

    A command that declares one of these options itself keeps its own (conflicts
    resolve to the later declaration)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("conflict_handler", "resolve")
        self.options: list[argparse.Action] = []  # as declared, for the help checks
        self.commands: argparse.Action | None = None
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"usbip-gateway {__version__}")
        # SUPPRESS: an option not given sets nothing, so a subcommand's parser cannot
        # overwrite what was given before its name (`certs --log-level debug init`).
        self.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help="least severe message logged (default: info)",
        )
        self.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default=argparse.SUPPRESS,
            help="`json`: one object per line (default: text)",
        )

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        default = action.default
        told = action.help is not None and "default" in action.help.lower()
        if (
            action.option_strings
            and not _switch(action)
            and not action.required
            and not told
            and default not in (None, argparse.SUPPRESS, [], ())
        ):
            shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
            action.help = f"{action.help or ''} (default: {shown})".strip()
        self.options = [a for a in self.options if a.dest != action.dest or a is action]
        self.options.append(action)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", CommandParser)
        action = super().add_subparsers(**kwargs)
        self.commands = action
        return action


def command_named(argv: Sequence[str], known: Sequence[str]) -> str | None:
    """The command `argv` gives (its first word that is not an option), if a known one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in known else None
    return None


def log_options(args: argparse.Namespace) -> tuple[str, str]:
    """--log-level and --log-format as given, else info and text."""
    level = getattr(args, "log_level", None) or "info"
    fmt = getattr(args, "log_format", None) or "text"
    return level, fmt


def leaves(problem: BaseException) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, in order; else the one given."""
    if isinstance(problem, BaseExceptionGroup):
        return [leaf for exc in problem.exceptions for leaf in leaves(exc)]
    return [problem]
