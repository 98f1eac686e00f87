"""DNS-SD for the Node: browse for Registration APIs (`_nmos-register._tcp`) and, when
none is found, advertise the Node itself (`_nmos-node._tcp`, peer-to-peer mode).

python-zeroconf runs in its own thread; the calls here that wait on it run in a worker
thread so that the Trio loop never blocks.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

log = logging.getLogger("gateway.nmos.dnssd")

REGISTER = "_nmos-register._tcp.local."
REGISTRATION_LEGACY = "_nmos-registration._tcp.local."
NODE = "_nmos-node._tcp.local."
RESOLVE_MS = 1000


@dataclass(frozen=True, slots=True, order=True)
class Registry:
    """A Registration API, best (lowest priority number) first."""

    priority: int
    host: str
    port: int
    name: str = ""


class _Names(ServiceListener):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}  # name -> service type

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names[name] = type_

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.pop(name, None)


def _txt(info: ServiceInfo, key: str) -> str:
    value = info.properties.get(key.encode())
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def suitable(info: ServiceInfo, version: str) -> Registry | None:
    """The registry an advertisement names, if it speaks plain HTTP and `version`."""
    if _txt(info, "api_proto") not in ("", "http") or info.port is None:
        return None
    versions = [v.strip() for v in _txt(info, "api_ver").split(",") if v.strip()]
    if versions and version not in versions:
        return None
    if _txt(info, "api_auth") == "true":
        return None
    try:
        priority = int(_txt(info, "pri") or 100)
    except ValueError:
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        return None
    return Registry(priority, addresses[0], info.port, info.name)


class DnsSd:
    """One zeroconf instance: a browser for registries, and the Node's advertisement."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.zc: Zeroconf | None = None
        self.names = _Names()
        self.advertised: ServiceInfo | None = None

    async def start(self) -> None:
        self.zc = await trio.to_thread.run_sync(lambda: Zeroconf(ip_version=IPVersion.V4Only))
        ServiceBrowser(self.zc, [REGISTER, REGISTRATION_LEGACY], self.names)

    async def registries(self) -> list[Registry]:
        """The suitable registries advertised now, best first."""
        return await trio.to_thread.run_sync(self._resolve)

    def _resolve(self) -> list[Registry]:
        assert self.zc is not None
        with self.names.lock:
            names = list(self.names.names.items())
        found = []
        for name, type_ in names:
            try:
                info = self.zc.get_service_info(type_, name, RESOLVE_MS)
                registry = None if info is None else suitable(info, self.version)
            except Exception as exc:  # a malformed advertisement: not a registry
                log.warning("NMOS: ignoring the advertisement %r: %s", name[:100], exc)
                continue
            if registry is not None:
                found.append(registry)
        return sorted(found)

    async def advertise(self, name: str, host: str, port: int, txt: dict[str, str]) -> None:
        """Advertise the Node (peer-to-peer), or update the advertisement."""
        instance = name.replace(".", "-")[:63]
        info = ServiceInfo(
            NODE,
            f"{instance}.{NODE}",
            addresses=[socket.inet_aton(host)],
            port=port,
            properties=txt,
            server=f"{instance.lower()}.local.",
        )
        await trio.to_thread.run_sync(self._advertise, info)

    def _advertise(self, info: ServiceInfo) -> None:
        assert self.zc is not None
        if self.advertised is None:
            self.zc.register_service(info, allow_name_change=True)
            log.info("NMOS: advertising the Node (peer-to-peer) as %s", info.name)
        else:
            self.zc.update_service(info)
        self.advertised = info

    async def withdraw(self) -> None:
        await trio.to_thread.run_sync(self._withdraw)

    def _withdraw(self) -> None:
        if self.advertised is not None and self.zc is not None:
            self.zc.unregister_service(self.advertised)
            log.info("NMOS: Node advertisement withdrawn")
        self.advertised = None

    async def close(self) -> None:
        def close() -> None:
            self._withdraw()
            if self.zc is not None:
                self.zc.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)
