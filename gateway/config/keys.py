"""How one configuration key is declared, once: its kind (TOML type and range), unit,
help text and optional command-line flag.

A key is a dataclass field whose metadata holds a `Key`: the field gives the key's name
and default, the `Key` the rest. The TOML reader, the flags and docs/configuration.md
are all made from these declarations (gateway/config/schema.py walks them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.config.address import Address, parse_address
from gateway.config.errors import ConfigError

T = TypeVar("T")
KEY = "gateway.config.key"
_INT_MAX = 2**31 - 1  # the metadata entry that holds a field's `Key`


class Kind(Protocol):
    """What a key's TOML value must be, and how it becomes the setting's value."""

    @property
    def unit(self) -> str: ...

    def describe(self) -> str:
        """The accepted values, for the reference."""
        ...

    def read(self, value: Any, key: str, base: Path) -> Any:
        """`value` as found (never None); `base` is what relative paths are relative to."""
        ...


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Seconds:
    minimum: float = 0.0
    unit: str = "s"

    def describe(self) -> str:
        return f"seconds > {self.minimum:g}"

    def read(self, value: Any, key: str, base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number of seconds, not {value!r}")
        if value <= self.minimum:
            raise ConfigError(key, f"must be greater than {self.minimum:g}")
        return float(value)


@dataclass(frozen=True, slots=True)
class Integer:
    minimum: int = 1
    maximum: int = _INT_MAX
    unit: str = ""

    def describe(self) -> str:
        bounds = (
            f" ≥ {self.minimum}" if self.maximum == _INT_MAX else f" {self.minimum}..{self.maximum}"
        )
        return f"integer{bounds}" + (f" ({self.unit})" if self.unit else "")

    def read(self, value: Any, key: str, base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, not {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise ConfigError(key, f"{value} is outside {self.minimum}..{self.maximum}")
        return value


@dataclass(frozen=True, slots=True)
class Boolean:
    unit: str = ""

    def describe(self) -> str:
        return "`true` or `false`"

    def read(self, value: Any, key: str, base: Path) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, not {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class Text:
    unit: str = ""

    def describe(self) -> str:
        return "string"

    def read(self, value: Any, key: str, base: Path) -> str:
        return _string(value, key)


@dataclass(frozen=True, slots=True)
class Choice:
    options: tuple[str, ...]
    unit: str = ""

    def describe(self) -> str:
        return " or ".join(f'`"{option}"`' for option in self.options)

    def read(self, value: Any, key: str, base: Path) -> str:
        text = _string(value, key)
        if text not in self.options:
            raise ConfigError(key, f"{text!r} is not one of {', '.join(self.options)}")
        return text


@dataclass(frozen=True, slots=True)
class File:
    """An existing file; a relative path is relative to the configuration file."""

    unit: str = ""

    def describe(self) -> str:
        return "path to a file"

    def read(self, value: Any, key: str, base: Path) -> Path:
        path = Path(_string(value, key))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ConfigError(key, f"file not found: {path}")
        return path


@dataclass(frozen=True, slots=True)
class Directory:
    relative: bool = True  # a relative path is relative to the configuration file
    empty_is_off: bool = False  # "" means none (the value None)
    unit: str = ""

    def describe(self) -> str:
        return 'path to a directory; `""` for none' if self.empty_is_off else "path to a directory"

    def read(self, value: Any, key: str, base: Path) -> Path | None:
        if self.empty_is_off and value == "":
            return None
        path = Path(_string(value, key))
        return path if path.is_absolute() or not self.relative else base / path


@dataclass(frozen=True, slots=True)
class HostPort:
    default_port: int
    unit: str = ""

    def describe(self) -> str:
        return f'`"HOST:PORT"` (port {self.default_port} when left out)'

    def read(self, value: Any, key: str, base: Path) -> Address:
        return parse_address(_string(value, key), key, self.default_port)


@dataclass(frozen=True, slots=True)
class HostPorts:
    default_port: int
    unit: str = ""

    def describe(self) -> str:
        return '`"HOST:PORT"` or a list of them'

    def read(self, value: Any, key: str, base: Path) -> tuple[Address, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ConfigError(key, "must be HOST:PORT or a list of them")
        return tuple(parse_address(i, key, self.default_port) for i in items)


@dataclass(frozen=True, slots=True)
class NamedHostPorts:
    """`"NAME=HOST:PORT"` entries: a name, and the local address that reaches it."""

    default_port: int
    unit: str = ""

    def describe(self) -> str:
        return '`"NAME=HOST:PORT"` or a list of them'

    def read(self, value: Any, key: str, base: Path) -> tuple[tuple[str, Address], ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(key, "must be NAME=HOST:PORT or a list of them")
        entries: list[tuple[str, Address]] = []
        for item in items:
            name, sep, where = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(key, f"{item!r} is not NAME=HOST:PORT")
            entries.append((name.strip(), parse_address(where.strip(), key, self.default_port)))
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise ConfigError(key, "a name appears twice")
        return tuple(entries)


@dataclass(frozen=True, slots=True)
class Strings:
    empty: bool = True  # whether an empty list is allowed
    unit: str = ""

    def describe(self) -> str:
        return "string or list of strings" + ("" if self.empty else ", not empty")

    def read(self, value: Any, key: str, base: Path) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise ConfigError(key, "must be a string or a list of non-empty strings")
        if not items and not self.empty:
            raise ConfigError(key, "must not be empty")
        return tuple(items)


@dataclass(frozen=True, slots=True)
class Integers:
    """A list of integers in a range (USB class codes, for one)."""

    minimum: int = 0
    maximum: int = _INT_MAX
    unit: str = ""

    def describe(self) -> str:
        return f"list of integers {self.minimum}..{self.maximum}"

    def read(self, value: Any, key: str, base: Path) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list of integers, not {value!r}")
        each = Integer(self.minimum, self.maximum)
        return tuple(each.read(item, key, base) for item in value)


@dataclass(frozen=True, slots=True)
class Rules:
    """Lines in the policy language, each read after `prefix`; checked now, so a typo is
    a configuration error."""

    prefix: str
    unit: str = ""

    def describe(self) -> str:
        return "policy rule attributes, a string or a list of them"

    def read(self, value: Any, key: str, base: Path) -> tuple[str, ...]:
        from gateway.policy import Policy, PolicyError  # noqa: PLC0415 - policy imports late

        lines = Strings().read(value, key, base)
        try:
            Policy.parse("".join(f"{self.prefix}{line}\n" for line in lines), key)
        except PolicyError as exc:
            raise ConfigError(key, f"entry {exc.line}: {exc.message}") from None
        return lines


@dataclass(frozen=True, slots=True)
class Flag:
    """The command-line flag that sets a key."""

    name: str
    help: str | None = None  # instead of the key's help, when the flag says it differently
    const: bool | None = None  # a switch that stores this value, without an argument
    repeat: bool = False  # each use adds one item to the list
    metavar: str | None = None  # what the argument is, when the key's kind does not say
    dest: str | None = None  # the parsed arguments' attribute, when not the flag's name

    @property
    def attribute(self) -> str:
        return self.dest or self.name.removeprefix("--").replace("-", "_")


@dataclass(frozen=True, slots=True)
class Key:
    kind: Kind
    help: str
    flag: Flag | None = None
    default_text: str | None = None  # the default in words, when its value does not say it
    # For a key without a default: its value from the table's other values when absent.
    fallback: Callable[[Mapping[str, Any]], Any] | None = None


def declare(
    kind: Kind,
    help: str,
    *,
    flag: Flag | None = None,
    default_text: str | None = None,
    fallback: Callable[[Mapping[str, Any]], Any] | None = None,
) -> dict[str, Key]:
    """Field metadata declaring a key (for a field without a default)."""
    return {KEY: Key(kind, help, flag, default_text, fallback)}


def setting(
    default: T,
    kind: Kind,
    help: str,
    *,
    flag: Flag | None = None,
    default_text: str | None = None,
) -> T:
    """A dataclass field declaring a key and its default."""
    field: T = dataclasses.field(
        default=default, metadata=declare(kind, help, flag=flag, default_text=default_text)
    )
    return field
