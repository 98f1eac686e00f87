"""Each key is declared once, and the reader, the flags and the errors all follow it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import _overrides, build_parser
from gateway.config import Address, ConfigError, client_config, load
from gateway.config.keys import (
    Boolean,
    Choice,
    File,
    HostPort,
    HostPorts,
    Integer,
    NamedHostPorts,
    Seconds,
)
from gateway.config.schema import ROLES, Declared, declared_keys, role_keys
from gateway.config.settings import ClientConfig, ServerConfig

# The flags each role had before the declarations made them (less --data-plane, which went
# with the Trio data plane); none may go missing.
COMMON_FLAGS = {
    "--listen", "--cert", "--key", "--ca", "--crl", "--tls-min-version", "--handshake-timeout",
    "--connect-timeout", "--max-transfer-length", "--max-pending-urbs", "--max-connections",
    "--shutdown-timeout", "--log-level", "--log-format", "--metrics-listen",
    "--metrics-no-status", "--metrics-status-listen", "--metrics-device-label", "--compression",
    "--compression-level", "--mptcp", "--nmos", "--nmos-listen",
}  # fmt: skip
ROLE_FLAGS = {
    "server": {
        "--upstream",
        "--request-timeout",
        "--policy",
        "--allow-cn",
        "--allow-uri",
        "--allow-dns",
        "--audit-log",
        "--dial",
        "--dial-name",
    },
    "client": {"--server", "--server-name", "--agent", "--reverse-listen", "--reverse-server"},
}


def _flagged(role: str) -> list[Declared]:
    return [d for d in role_keys(role) if d.key.flag is not None]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_has_its_flags_and_no_key_twice(role: str) -> None:
    assert {d.key.flag.name for d in _flagged(role) if d.key.flag} == (
        COMMON_FLAGS | ROLE_FLAGS[role]
    )
    dotted = [d.dotted for d in role_keys(role)]
    assert len(dotted) == len(set(dotted))


def _toml(value: Any) -> Any:
    """A default as it would be written in the TOML file."""
    if isinstance(value, tuple):
        return [_toml(item) for item in value]
    return str(value) if isinstance(value, Path | Address) else value


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_a_value_its_key_accepts(role: str, tmp_path: Path) -> None:
    for d in role_keys(role):
        # None, and defaults the reference puts in words (a discovery name of "" is the
        # host name), stand for "not set": they are not values to write.
        if d.default in (dataclasses.MISSING, None) or d.key.default_text is not None:
            continue
        assert d.key.kind.read(_toml(d.default), d.dotted, tmp_path) == d.default, d.dotted


def _sample(d: Declared, files: Path) -> list[str]:
    """A command line setting this key to something other than its default."""
    assert d.key.flag is not None
    kind = d.key.kind
    if d.key.flag.const is not None:
        return [d.key.flag.name]
    if isinstance(kind, Choice):
        value = next(option for option in kind.options if option != d.default)
    elif isinstance(kind, Seconds):
        value = "7.5"
    elif isinstance(kind, Integer):
        value = "7"
    elif isinstance(kind, HostPort | HostPorts):
        value = "[::1]:7"
    elif isinstance(kind, NamedHostPorts):
        value = "dev.example=[::1]:7"
    elif isinstance(kind, File):
        value = str(files / "gw.pem")
    else:
        value = "-"
    return [d.key.flag.name, value]


@pytest.mark.parametrize("role", ROLES)
def test_each_flag_sets_its_own_key_and_no_other(role: str, tmp_path: Path) -> None:
    (tmp_path / "gw.pem").write_text("placeholder")
    for d in _flagged(role):
        args = build_parser().parse_args([role, *_sample(d, tmp_path)])
        given = {k: v for k, v in _overrides(role, args).items() if v is not None}
        assert list(given) == [d.dotted]
        value = given[d.dotted]
        if isinstance(d.key.kind, HostPorts | NamedHostPorts):
            value = value[0]
        assert d.key.kind.read(value, d.dotted, tmp_path) is not None


def test_flags_reach_the_configuration(tmp_path: Path) -> None:
    for name in ("gw.pem", "gw.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    argv = [
        "client", "--cert", str(tmp_path / "gw.pem"), "--key", str(tmp_path / "gw.key"),
        "--ca", str(tmp_path / "ca.pem"), "--server", "gw.example", "--handshake-timeout", "2.5",
        "--max-pending-urbs", "9", "--mptcp", "--agent", "--metrics-no-status",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    config = load("client", None, _overrides("client", args))
    assert isinstance(config, ClientConfig)
    assert config.server == Address("gw.example", 3240)
    assert config.server_name == "gw.example"
    assert config.handshake_timeout == 2.5
    assert config.limits.max_pending_urbs == 9
    assert config.transport.mptcp
    assert config.agent.enabled
    assert not config.metrics.status


def test_shared_keys_are_read_from_each_role_table(tmp_path: Path) -> None:
    shared = {d.name for d in declared_keys(ServerConfig, "server")} & {
        d.name for d in declared_keys(ClientConfig, "client")
    }
    assert {"handshake_timeout", "shutdown_timeout", "listen"} <= shared
    with pytest.raises(ConfigError, match=r"^client\.handshake_timeout: must be greater than 0"):
        client_config({"client": {"server": "gw", "handshake_timeout": 0}, "tls": tls(tmp_path)})


def tls(directory: Path) -> dict[str, str]:
    for name in ("cert", "key", "ca"):
        (directory / name).write_text("placeholder")
    return {name: str(directory / name) for name in ("cert", "key", "ca")}


def test_a_settings_field_without_a_declaration_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Forgotten:
        level: int = 3

    with pytest.raises(TypeError, match=r"Forgotten\.level is not a declared"):
        list(declared_keys(Forgotten, "forgotten"))


def test_boolean_and_seconds_errors_keep_their_wording() -> None:
    with pytest.raises(ConfigError, match=r"^t\.k: must be true or false, not 'yes'$"):
        Boolean().read("yes", "t.k", Path())
    with pytest.raises(ConfigError, match=r"^t\.k: must be a number of seconds, not True$"):
        Seconds().read(True, "t.k", Path())


def test_reverse_servers_are_names_with_local_addresses(tmp_path: Path) -> None:
    kind = NamedHostPorts(3240)
    assert kind.read(["dev-a.example=127.0.0.1:3241", "spiffe://lab/b=[::1]"], "k", tmp_path) == (
        ("dev-a.example", Address("127.0.0.1", 3241)),
        ("spiffe://lab/b", Address("::1", 3240)),
    )
    with pytest.raises(ConfigError, match="not NAME=HOST:PORT"):
        kind.read(["127.0.0.1:3241"], "k", tmp_path)
    with pytest.raises(ConfigError, match="twice"):
        kind.read(["a=127.0.0.1:1", "a=127.0.0.1:2"], "k", tmp_path)
