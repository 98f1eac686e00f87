"""Finding server gateways on the local network: DNS-SD over mDNS (RFC 6762/6763).

The server gateway announces `NAME._usbip-gw._tcp.local.` with its port and a TXT record
that says only what a client needs to decide whether to try it: `tls=1` (the port speaks
mutual TLS, never plain USB/IP), `proto=usbip-gw/1` and the gateway's `version`. No device
details are published. Clients browse for the type (`usbip-gateway discover`); mDNS does
not cross routers, so servers on other networks are configured by hand.

An announcement proves nothing: whoever answers must still present a certificate from
the client's CA with the expected name. Discovery only saves typing an address.

python-zeroconf runs its own thread and asyncio loop; these functions drive it from Trio
through worker threads.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import ifaddr
import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from gateway import __version__
from gateway.config import Address, DiscoverySettings

log = logging.getLogger("gateway.companions.discovery")

SERVICE_TYPE = "_usbip-gw._tcp.local."
PROTOCOL = "usbip-gw/1"
RESOLVE_TIMEOUT_MS = 3000


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def local_addresses() -> list[str]:
    """Every IPv4 address of this host's interfaces, loopback last."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def announced_addresses(settings: DiscoverySettings, listen: Sequence[Address]) -> list[str]:
    """Where clients should connect: the configured interfaces, else the listen addresses,
    else (listening on the wildcard) every address of this host except loopback."""
    if settings.interfaces:
        return list(settings.interfaces)
    concrete = [a.host for a in listen if not _is_wildcard(a.host) and ":" not in a.host]
    if concrete:
        return concrete
    every = local_addresses()
    outside = [a for a in every if not ipaddress.ip_address(a).is_loopback]
    return outside or every


def instance_name(settings: DiscoverySettings) -> str:
    name = settings.name or socket.gethostname().split(".")[0] or "usbip-gateway"
    return name.replace(".", "-")[:63]


def service_info(name: str, port: int, addresses: Sequence[str]) -> ServiceInfo:
    host = name.lower().replace(" ", "-")
    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in addresses],
        port=port,
        properties={"tls": "1", "proto": PROTOCOL, "version": __version__},
        server=f"{host}.local.",
    )


def _zeroconf(interfaces: Sequence[str]) -> Zeroconf:
    if interfaces:
        return Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    return Zeroconf(ip_version=IPVersion.V4Only)


class Announcer:
    """Registers the service while `run` runs; withdrawn (a goodbye packet) when it ends."""

    def __init__(self, settings: DiscoverySettings, port: int, addresses: Sequence[str]) -> None:
        self.settings = settings
        self.info = service_info(instance_name(settings), port, addresses)
        self.registered = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        zc = await trio.to_thread.run_sync(_zeroconf, self.settings.interfaces)
        try:
            await trio.to_thread.run_sync(self._register, zc)
            self.registered = True
            log.info(
                "announcing %s on port %d at %s (mDNS)",
                self.info.name,
                self.info.port,
                ", ".join(self.info.parsed_addresses()),
            )
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, zc)
            self.registered = False

    def _register(self, zc: Zeroconf) -> None:
        zc.register_service(self.info, allow_name_change=True)

    def _close(self, zc: Zeroconf) -> None:
        try:
            if self.registered:
                zc.unregister_service(self.info)
        finally:
            zc.close()


@dataclass(frozen=True, slots=True)
class FoundServer:
    name: str  # the DNS-SD instance name, without the service type
    address: Address
    host: str  # the SRV target, e.g. gw.local.
    version: str
    tls: bool

    def __str__(self) -> str:
        return f"{self.name}\t{self.address}\t{self.host}\tversion {self.version or '?'}"


class _Collect(ServiceListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass


def _txt(info: ServiceInfo, key: str) -> str:
    value = info.properties.get(key.encode())
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _browse(seconds: float, interfaces: Sequence[str]) -> list[FoundServer]:
    zc = _zeroconf(interfaces)
    try:
        listener = _Collect()
        browser = ServiceBrowser(zc, SERVICE_TYPE, listener)
        try:
            # Browse for the whole window: answers arrive over it, spread by the responders.
            threading.Event().wait(seconds)
        finally:
            # Once only: a second cancel makes zeroconf log a KeyError with its traceback.
            browser.cancel()
        return [found for name in list(listener.names) for found in _resolve(zc, name)]
    finally:
        zc.close()


def _resolve(zc: Zeroconf, name: str) -> list[FoundServer]:
    """The addresses of one announced instance (none if it did not resolve or is not TLS)."""
    info = zc.get_service_info(SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS)
    if info is None or info.port is None:
        return []
    tls = _txt(info, "tls") == "1"
    if not tls:
        log.warning("%s does not announce tls=1: ignored", name)
        return []
    return [
        FoundServer(
            name=name.removesuffix("." + SERVICE_TYPE),
            address=Address(address, info.port),
            host=info.server or "",
            version=_txt(info, "version"),
            tls=tls,
        )
        for address in info.parsed_addresses(IPVersion.V4Only)
    ]


async def browse(seconds: float = 3.0, interfaces: Sequence[str] = ()) -> list[FoundServer]:
    """Server gateways that answered within `seconds` (each address separately)."""
    return await trio.to_thread.run_sync(_browse, seconds, interfaces)


# ------------------------------------------------------------------ the command


def _cmd_discover(args: argparse.Namespace) -> int:
    try:
        found = trio.run(browse, args.timeout, tuple(args.interface or ()))
    except OSError as exc:  # no multicast-capable interface, an address not this host's
        print(f"usbip-gateway discover: cannot browse with mDNS: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps([asdict(f) | {"address": str(f.address)} for f in found], indent=1))
    else:
        for server in found:
            print(server)
    if not found:
        print(
            "no server gateway answered (mDNS stays on the local network: "
            "give distant servers with client.server)",
            file=sys.stderr,
        )
        return 1
    return 0


def add_discover_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "discover", help=f"list server gateways announced on the local network ({SERVICE_TYPE})"
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, metavar="SECONDS", help="how long to listen"
    )
    parser.add_argument(
        "--interface",
        action="append",
        metavar="ADDRESS",
        help="browse on the interface with this address (repeatable; default all)",
    )
    parser.add_argument("--json", action="store_true", help="JSON instead of lines")
    parser.set_defaults(func=_cmd_discover)
    return parser
