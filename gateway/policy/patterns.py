"""The values a rule lists, each able to say whether it matches one fact value."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from .facts import Interface
from .text import quote

# What a fact value can be: strings, a (vendor, product) pair, a class byte, an interface.
Value = str | int | tuple[int, ...]


def render(value: Value) -> str:
    """A fact value the way a rule would write it."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int):
        return f"{value:02x}"
    if len(value) == 2:
        return f"{value[0]:04x}:{value[1]:04x}"
    return ":".join(f"{part:02x}" for part in value)


class Pattern(Protocol):
    @property
    def text(self) -> str: ...
    def matches(self, value: Value) -> bool: ...


@dataclass(frozen=True, slots=True)
class Glob:
    """A string where each `None` part is a `*`: any run of characters, '/' and '.' too."""

    parts: tuple[str | None, ...]
    text: str
    fold_case: bool = False  # DNS names compare case-insensitively
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = None
        if None in self.parts:
            body = "".join(".*" if p is None else re.escape(p) for p in self.parts)
            regex = re.compile(body, re.DOTALL | (re.IGNORECASE if self.fold_case else 0))
        object.__setattr__(self, "_regex", regex)

    @property
    def literal(self) -> str:
        return "".join("*" if p is None else p for p in self.parts)

    def matches(self, value: Value) -> bool:
        if not isinstance(value, str):
            return False
        if self._regex is not None:
            return self._regex.fullmatch(value) is not None
        if self.fold_case:
            return self.literal.casefold() == value.casefold()
        return self.literal == value


@dataclass(frozen=True, slots=True)
class DeviceId:
    """`VID:PID`, `VID:*` or `*:*` (None is the wildcard)."""

    vendor: int | None
    product: int | None

    @property
    def text(self) -> str:
        vendor = "*" if self.vendor is None else f"{self.vendor:04x}"
        product = "*" if self.product is None else f"{self.product:04x}"
        return f"{vendor}:{product}"

    def matches(self, value: Value) -> bool:
        if not (isinstance(value, tuple) and len(value) == 2):
            return False
        return self.vendor in (None, value[0]) and self.product in (None, value[1])


@dataclass(frozen=True, slots=True)
class ClassByte:
    """A device class, two hex digits."""

    value: int

    @property
    def text(self) -> str:
        return f"{self.value:02x}"

    def matches(self, value: Value) -> bool:
        return isinstance(value, int) and value == self.value


@dataclass(frozen=True, slots=True)
class InterfaceType:
    """`cc:ss:pp`, any byte may be `*` (None)."""

    fields: tuple[int | None, int | None, int | None]

    @property
    def text(self) -> str:
        return ":".join("*" if f is None else f"{f:02x}" for f in self.fields)

    def matches(self, value: Value) -> bool:
        if not (isinstance(value, tuple) and len(value) == 3):
            return False
        interface: Interface = (value[0], value[1], value[2])
        return all(f is None or f == v for f, v in zip(self.fields, interface, strict=True))
