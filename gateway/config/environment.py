"""Configuration from the environment, for containers: `USBIP_GATEWAY_<TABLE>_<KEY>`.

Each declared key has one variable, named from its table and key (`[tls] cert` is
`USBIP_GATEWAY_TLS_CERT`, `[server] listen` is `USBIP_GATEWAY_SERVER_LISTEN`). The
variables override the file and the flags override them. A value is read as the key's
kind reads it from TOML: numbers and `true`/`false` as written, lists as a TOML array
(`["a", "b"]`) or, for addresses and strings, comma-separated.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from gateway.config.errors import ConfigError
from gateway.config.keys import Boolean, HostPorts, Integer, Kind, Rules, Seconds, Strings
from gateway.config.schema import ROLES, Declared, role_keys

PREFIX = "USBIP_GATEWAY_"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def variable(d: Declared) -> str:
    """The environment variable that sets key `d`."""
    return f"{PREFIX}{d.table}_{d.name}".upper().replace("-", "_")


def _every_key() -> Iterator[Declared]:
    for role in ROLES:
        yield from role_keys(role)


def _value(kind: Kind, text: str, name: str) -> Any:
    """`text` as the TOML value the key's kind reads."""
    if isinstance(kind, Boolean):
        lowered = text.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ConfigError(name, f"must be true or false, not {text!r}")
    if isinstance(kind, Integer | Seconds):
        try:
            return int(text) if isinstance(kind, Integer) else float(text)
        except ValueError:
            raise ConfigError(name, f"must be a number, not {text!r}") from None
    if isinstance(kind, HostPorts | Strings | Rules):
        if text.lstrip().startswith("["):
            try:
                return tomllib.loads(f"value = {text}")["value"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(name, f"not a TOML array: {exc}") from None
        if isinstance(kind, Rules):
            return [text]
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def environment_overrides(role: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """The variables of `role` set in `environ`, as dotted keys. A `USBIP_GATEWAY_`
    variable that no role knows is an error (a typo would otherwise be ignored)."""
    known = {variable(d) for d in _every_key()}
    unknown = sorted(name for name in environ if name.startswith(PREFIX) and name not in known)
    if unknown:
        raise ConfigError(unknown[0], "unknown variable (docs/configuration.md lists them)")
    values: dict[str, Any] = {}
    for d in role_keys(role):
        name = variable(d)
        if name in environ:
            values[d.dotted] = _value(d.key.kind, environ[name], f"{name} ({d.dotted})")
    return values
