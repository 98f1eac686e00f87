"""The declared keys of a role, table by table, for the reader, the flags and the docs."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.config.keys import KEY, Key
from gateway.config.settings import PROTOCOL_LIMIT_KEYS, ClientConfig, GatewayConfig, ServerConfig
from gateway.protocol import Limits

ROLES: dict[str, type[GatewayConfig]] = {"server": ServerConfig, "client": ClientConfig}
_FOREIGN: dict[type, dict[str, Key]] = {Limits: PROTOCOL_LIMIT_KEYS}


@dataclass(frozen=True, slots=True)
class Declared:
    """One key as declared: where it lives, and its field's default (MISSING: none)."""

    table: str
    name: str
    key: Key
    default: Any

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}"

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING and self.key.fallback is None


@dataclass(frozen=True, slots=True)
class Table:
    """A settings class and the TOML table it is read from (the field it fills)."""

    field: str
    name: str
    cls: type[Any]


def declared_keys(cls: type[Any], table: str) -> Iterator[Declared]:
    """The keys `cls` declares. Every field of a settings class is one: a field left
    undeclared could be neither read nor documented."""
    foreign = _FOREIGN.get(cls, {})
    for f in dataclasses.fields(cls):
        key = f.metadata.get(KEY) or foreign.get(f.name)
        if key is not None:
            yield Declared(table, f.name, key, f.default)
        elif not issubclass(cls, GatewayConfig):  # there, the other fields are tables
            raise TypeError(f"{cls.__name__}.{f.name} is not a declared configuration key")


def tables(config: type[GatewayConfig]) -> Iterator[Table]:
    """The settings tables of a role's configuration, in declaration order."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if KEY not in f.metadata:
            yield Table(f.name, f.metadata.get("table", f.name), hints[f.name])


def role_keys(role: str) -> Iterator[Declared]:
    """Every key of a role: those of its own table, then each table's."""
    config = ROLES[role]
    yield from declared_keys(config, role)
    for table in tables(config):
        yield from declared_keys(table.cls, table.name)
