"""The Sender's transport file: an SDP description of a TCP server (RFC 4145), one media
description per leg; two legs (MPTCP) are grouped as duplicates (RFC 7104, `a=group:DUP`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MEDIA_FORMAT = "usb"
MAX_SDP = 16 * 1024


class SdpError(ValueError):
    """A transport file this Receiver cannot use; the message says why."""


@dataclass(frozen=True, slots=True)
class Leg:
    host: str
    port: int


def _address_type(host: str) -> str:
    try:
        return "IP6" if ipaddress.ip_address(host).version == 6 else "IP4"
    except ValueError:
        return "IP4"


def make_sdp(legs: list[Leg], *, session_id: int, version: int, label: str) -> str:
    """The transport file for a Sender listening on `legs`."""
    origin = legs[0].host
    lines = [
        "v=0",
        f"o=- {session_id} {version} IN {_address_type(origin)} {origin}",
        f"s={label or '-'}",
        "t=0 0",
    ]
    if len(legs) > 1:
        lines.append("a=group:DUP " + " ".join(str(i + 1) for i in range(len(legs))))
    for index, leg in enumerate(legs, start=1):
        lines += [
            f"m=application {leg.port} TCP {MEDIA_FORMAT}",
            f"c=IN {_address_type(leg.host)} {leg.host}",
            "a=setup:passive",
        ]
        if len(legs) > 1:
            lines.append(f"a=mid:{index}")
    return "\r\n".join(lines) + "\r\n"


def parse_sdp(text: str) -> list[Leg]:
    """The legs of a transport file `make_sdp` could have written: the server's address
    and port of each `m=application <port> TCP usb`, in order."""
    if len(text) > MAX_SDP:
        raise SdpError(f"transport file over {MAX_SDP} bytes")
    legs: list[Leg] = []
    session_host: str | None = None
    port: int | None = None
    host: str | None = None

    def close_media() -> None:
        if port is None:
            return
        address = host or session_host
        if address is None:
            raise SdpError("a media description without a connection address (c=)")
        legs.append(Leg(address, port))

    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            if line:
                raise SdpError(f"not an SDP line: {line[:40]!r}")
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            close_media()
            port, host = _media(value), None
        elif kind == "c":
            address = _connection(value)
            if port is None:
                session_host = address
            else:
                host = address
    close_media()
    if not legs:
        raise SdpError("no media description (m=application <port> TCP usb)")
    return legs


def _media(value: str) -> int:
    parts = value.split()
    if len(parts) < 4 or parts[0] != "application" or parts[2].upper() != "TCP":
        raise SdpError(f"not a TCP application media description: m={value[:60]}")
    if parts[3] != MEDIA_FORMAT:
        raise SdpError(f"media format {parts[3]!r} is not {MEDIA_FORMAT!r}")
    try:
        port = int(parts[1])
    except ValueError:
        raise SdpError(f"bad port {parts[1]!r}") from None
    if not 1 <= port <= 65535:
        raise SdpError(f"port {port} out of range")
    return port


def _connection(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad connection line: c={value[:60]}")
    address = parts[2].split("/", 1)[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SdpError(f"connection address {address!r} is not an IP address") from None
    return address
