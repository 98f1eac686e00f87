"""Reading: one TOML file per role, command-line flags over it, checked against the
declarations. Every problem names the key it is about (`tls.cert: file not found`), so a
bad config is a one-line fix, not a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gateway.config.address import Address, is_loopback
from gateway.config.environment import environment_overrides
from gateway.config.errors import ConfigError
from gateway.config.schema import ROLES, Declared, declared_keys, tables
from gateway.config.settings import ClientConfig, GatewayRole, ServerConfig


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, "must be a table")
    return value


def _values(declared: Iterable[Declared], data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for d in declared:
        raw = data.get(d.name)
        if raw is not None:
            values[d.name] = d.key.kind.read(raw, d.dotted, base)
        elif d.key.fallback is not None:
            values[d.name] = d.key.fallback(values)
        elif d.required:
            raise ConfigError(d.dotted, "is required")
    return values


def _no_unknown(data: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", "unknown key")


def _config(role: GatewayRole, data: Mapping[str, Any], base: Path) -> ServerConfig | ClientConfig:
    config = ROLES[role]
    known: dict[str, set[str]] = {role: set()}
    own = list(declared_keys(config, role))
    values = _values(own, _table(data, role), base)
    known[role].update(d.name for d in own)
    for table in tables(config):
        keys = list(declared_keys(table.cls, table.name))
        values[table.field] = table.cls(**_values(keys, _table(data, table.name), base))
        known.setdefault(table.name, set()).update(d.name for d in keys)
    for name, names in known.items():
        _no_unknown(_table(data, name), names, f"{name}.")
    _no_unknown(data, set(known), "")
    result = config(**values)
    assert isinstance(result, ServerConfig | ClientConfig)
    _not_itself(result)
    if isinstance(result, ServerConfig):
        policy = result.policy
        if policy.file is not None and (policy.allow_cn or policy.allow_uri or policy.allow_dns):
            raise ConfigError(
                "policy.file",
                "give a policy file or --allow-cn/--allow-uri/--allow-dns, not both "
                "(write the shorthands as rules in the file)",
            )
    return result


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _own(listen: tuple[Address, ...], target: Address) -> Address | None:
    """The listen address `target` reaches, if it is one of them (port 0 never is)."""
    for address in listen:
        hosts = {address.host, target.host}
        same_host = (
            len(hosts) == 1
            or (_wildcard(address.host) and (is_loopback(target.host) or _wildcard(target.host)))
            or ("localhost" in hosts and all(is_loopback(host) for host in hosts))
        )
        if address.port == target.port and address.port != 0 and same_host:
            return address
    return None


def _not_itself(config: ServerConfig | ClientConfig) -> None:
    """Refuse a next hop that is one of the gateway's own listen addresses: it would
    connect to itself (usbipd's default port is the gateway's, 3240)."""
    if isinstance(config, ServerConfig):
        own = _own(config.listen, config.upstream)
        if own is not None:
            raise ConfigError(
                "server.upstream",
                f"{config.upstream} is this gateway's own listen address {own}: it would "
                "connect to itself. Run usbipd on another port (`usbipd --tcp-port 3241`) "
                'and set upstream = "127.0.0.1:3241" (--upstream 127.0.0.1:3241)',
            )
        return
    own = _own(config.listen, config.server)
    if own is not None:
        raise ConfigError(
            "client.server",
            f"{config.server} is this gateway's own listen address {own}: "
            "give the server gateway's address",
        )


def server_config(data: Mapping[str, Any], base: Path = Path(".")) -> ServerConfig:
    config = _config("server", data, base)
    assert isinstance(config, ServerConfig)
    return config


def client_config(data: Mapping[str, Any], base: Path = Path(".")) -> ClientConfig:
    config = _config("client", data, base)
    assert isinstance(config, ClientConfig)
    return config


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay dotted-key `overrides` ("tls.cert": ...) on a nested TOML mapping."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[leaf] = value
    return merged


def load(
    role: GatewayRole,
    path: Path | None,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> ServerConfig | ClientConfig:
    """Read `path` (optional), overlay the `USBIP_GATEWAY_*` variables of `environ`, then
    the command-line `overrides`, and validate."""
    data = read_toml(path)
    if environ is not None:
        data = merge(data, environment_overrides(role, environ))
    data = merge(data, overrides)
    base = path.parent if path is not None else Path(os.getcwd())
    return _config(role, data, base)
