"""SIGHUP rereads the configuration file: which settings a running gateway takes over
(the paths of its TLS files and policy, and what it does with them), and which only a
restart changes, named in one log line. A file that does not load keeps the running
configuration."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import (
    ClientConfig,
    ConfigError,
    GatewayConfig,
    GatewayRole,
    ServerConfig,
    load,
)
from gateway.config.schema import declared_keys, tables

log = logging.getLogger("gateway.reload")

# Taken over on reload; every other key needs a restart.
RELOADABLE: dict[str, tuple[str, ...]] = {
    "tls": ("cert", "key", "ca", "crl", "expiry_warning"),
    "policy": ("file", "revoke_on_reload"),
}

AnyConfig = TypeVar("AnyConfig", bound=GatewayConfig)


def role_of(config: GatewayConfig) -> GatewayRole:
    return "server" if isinstance(config, ServerConfig) else "client"


def flatten(config: GatewayConfig) -> dict[str, Any]:
    """Every key's value, by its dotted name (`tls.cert`, `server.listen`)."""
    role = role_of(config)
    cls = type(config)
    values = {f"{role}.{d.name}": getattr(config, d.name) for d in declared_keys(cls, role)}
    for table in tables(cls):
        part = getattr(config, table.field)
        for d in declared_keys(table.cls, table.name):
            values[d.dotted] = getattr(part, d.name)
    return values


def _reloadable(dotted: str) -> bool:
    table, _, name = dotted.partition(".")
    return name in RELOADABLE.get(table, ())


def needing_restart(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The keys whose value changed and that a running gateway cannot take over."""
    old, now = flatten(running), flatten(new)
    return sorted(k for k in now if now[k] != old.get(k) and not _reloadable(k))


def take_reloadable(running: AnyConfig, new: GatewayConfig, table: str) -> AnyConfig:
    """`running` with `table`'s reloadable keys as `new` has them."""
    current = getattr(running, table)
    values = {name: getattr(getattr(new, table), name) for name in RELOADABLE[table]}
    return dataclasses.replace(running, **{table: dataclasses.replace(current, **values)})


@dataclasses.dataclass
class ConfigSource:
    """Where a gateway's configuration came from: the file, the `USBIP_GATEWAY_*`
    variables (as at start) and the command-line flags over them. `loaded` is the
    configuration as last read (before anything adjusted it)."""

    role: GatewayRole
    path: Path | None
    overrides: Mapping[str, Any]
    environ: Mapping[str, str] | None
    loaded: ServerConfig | ClientConfig

    def reread(self) -> ServerConfig | ClientConfig | None:
        """The configuration as the file says now, or None (logged) if it does not load."""
        try:
            new = load(self.role, self.path, self.overrides, self.environ)
        except ConfigError as exc:
            log.error(
                "configuration reload from %s failed, keeping the running configuration: %s",
                self.path or "the command line",
                exc,
            )
            return None
        restart = needing_restart(self.loaded, new)
        if restart:
            log.warning(
                "configuration reloaded from %s; these changes take effect only after a "
                "restart (running values kept): %s",
                self.path or "the command line",
                ", ".join(restart),
            )
        else:
            log.info("configuration reloaded from %s", self.path or "the command line")
        loaded = take_reloadable(self.loaded, new, "tls")
        if isinstance(loaded, ServerConfig):
            loaded = take_reloadable(loaded, new, "policy")
        self.loaded = loaded
        return new
