"""HOST:PORT as configured: parsed once, printed back the same way."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.config.errors import ConfigError
from gateway.protocol import DEFAULT_PORT


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, key: str, default_port: int = DEFAULT_PORT) -> Address:
    """HOST:PORT, [IPv6]:PORT, or HOST alone (the default port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"{text!r} is not [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(key, f"{text!r}: put an IPv6 address in brackets, [::1]:3240")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(key, f"{text!r} has no host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(key, f"port {port_text!r} is not a number from 0 to 65535")
        port = int(port_text)
    return Address(host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
