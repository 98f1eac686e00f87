"""Configuration: TOML + flags, and errors that name the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    Address,
    ClientConfig,
    ConfigError,
    ServerConfig,
    load,
    merge,
    parse_address,
)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("gw.pem", "gw.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TLS = '[tls]\ncert = "gw.pem"\nkey = "gw.key"\nca = "ca.pem"\n'


def test_server_defaults_and_relative_paths(files: Path) -> None:
    config = load("server", _write(files / "server.toml", TLS), {})
    assert isinstance(config, ServerConfig)
    assert config.listen == (Address("0.0.0.0", 3240),)
    assert config.upstream == Address("127.0.0.1", 3241)  # usbipd beside the gateway
    assert config.tls.cert == files / "gw.pem"  # relative to the config file
    assert config.tls.min_version == "1.3"
    assert config.limits.max_iso_packets == 1024


def test_flags_override_the_file(files: Path) -> None:
    path = _write(files / "c.toml", TLS + '[client]\nserver = "gw.example:4000"\n')
    config = load("client", path, {"client.listen": ["127.0.0.1:3999"], "log.level": "debug"})
    assert isinstance(config, ClientConfig)
    assert config.server == Address("gw.example", 4000)
    assert config.server_name == "gw.example"  # defaults to the server's host
    assert config.listen == (Address("127.0.0.1", 3999),)
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        (TLS + "[server]\nlisen = 1\n", "server.lisen", "unknown key"),
        (TLS + "[server]\nupstream = 'host:99999'\n", "server.upstream", "port"),
        (TLS + "[server]\nhandshake_timeout = -1\n", "server.handshake_timeout", "greater"),
        (TLS + "[server]\nhandshake_timeout = 'x'\n", "server.handshake_timeout", "number"),
        (TLS + "[limits]\nmax_iso_packets = 2000\n", "limits.max_iso_packets", "outside"),
        (TLS + "[limits]\nmax_pending_urbs = true\n", "limits.max_pending_urbs", "integer"),
        (TLS + "[log]\nlevel = 'loud'\n", "log.level", "not one of"),
        (TLS.replace('"ca.pem"', '"missing.pem"'), "tls.ca", "file not found"),
        (TLS.replace('cert = "gw.pem"\n', ""), "tls.cert", "required"),
        (TLS + "[tls.extra]\n", "tls.extra", "unknown key"),
        ("server = 3\n" + TLS, "server", "must be a table"),
        (TLS + "[server]\nlisten = '::1:80'\n", "server.listen", "brackets"),
    ],
)
def test_errors_name_the_key(files: Path, toml: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load("server", _write(files / "s.toml", toml), {})
    assert info.value.key == key
    assert problem in info.value.problem


def test_client_needs_a_server(files: Path) -> None:
    with pytest.raises(ConfigError, match=r"^client\.server: is required"):
        load("client", _write(files / "c.toml", TLS), {})


def test_bad_toml_and_missing_file(files: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load("server", _write(files / "bad.toml", "[tls\n"), {})
    with pytest.raises(ConfigError, match="config file not found"):
        load("server", files / "nope.toml", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:3240", Address("10.0.0.1", 3240)),
        ("gw.example", Address("gw.example", 3240)),
        ("[::1]:3241", Address("::1", 3241)),
        ("[fe80::1]", Address("fe80::1", 3240)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text, "k") == expected
    assert parse_address(str(expected), "k") == expected


def test_merge_keeps_untouched_keys() -> None:
    base = {"tls": {"cert": "a", "key": "b"}, "server": {"listen": "x"}}
    merged = merge(base, {"tls.cert": "c", "server.upstream": None, "log.level": "info"})
    assert merged == {
        "tls": {"cert": "c", "key": "b"},
        "server": {"listen": "x"},
        "log": {"level": "info"},
    }
    assert base["tls"]["cert"] == "a"


@pytest.mark.parametrize("role", ["server", "client"])
def test_shipped_example_configs_load(role: str, files: Path) -> None:
    example = Path(__file__).parent.parent / "deploy" / "config" / f"{role}.toml"
    # The examples point at /etc; the TLS files are swapped for ones that exist here.
    tls = {
        f"tls.{k}": str(files / n)
        for k, n in (("cert", "gw.pem"), ("key", "gw.key"), ("ca", "ca.pem"))
    }
    config = load(role, example, tls)  # type: ignore[arg-type]
    assert config.limits.max_transfer_length == 16 * 1024 * 1024
    assert config.log.format == "text"


def test_resource_limits_and_idle_timeouts(files: Path) -> None:
    server = load("server", _write(files / "s.toml", TLS), {})
    assert isinstance(server, ServerConfig)
    assert server.resources.max_handshakes == 128
    assert server.resources.max_handshakes_per_source == 16
    assert server.resources.max_buffered_bytes == 256 * 1024 * 1024
    assert server.attached_idle_timeout is None  # off: a device may be idle for hours
    text = (
        TLS
        + '[client]\nserver = "gw:1"\nop_idle_timeout = 5\nattached_idle_timeout = 600\n'
        + "[limits]\nmax_handshakes = 7\nmax_handshakes_per_source = 2\n"
        + "max_buffered_bytes = 33554432\n"
    )
    client = load("client", _write(files / "c.toml", text), {})
    assert isinstance(client, ClientConfig)
    assert (client.op_idle_timeout, client.attached_idle_timeout) == (5.0, 600.0)
    assert client.resources.max_handshakes == 7
    assert client.resources.max_handshakes_per_source == 2
    assert client.resources.max_buffered_bytes == 32 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"^limits\.max_buffered_bytes: .* outside"):
        load("server", _write(files / "b.toml", TLS + "[limits]\nmax_buffered_bytes = 10\n"), {})
    with pytest.raises(ConfigError, match=r"^server\.op_idle_timeout: unknown key"):
        load("server", _write(files / "o.toml", TLS + "[server]\nop_idle_timeout = 5\n"), {})
