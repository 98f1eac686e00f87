"""An NMOS Node beside a running gateway: serves the APIs on the project's HTTP endpoint
(the same limits as /metrics), runs scheduled activations, keeps the Source's device
list current (server) and points the client gateway where its Receiver was connected.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import zlib
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import ifaddr
import trio

from gateway.config import Address, GatewayConfig, NmosSettings
from gateway.edges.client_gateway import ClientGateway, Route
from gateway.edges.server_gateway import ServerGateway
from gateway.observability.http import HttpLimits, serve_http
from gateway.policy import ClientFacts, Target
from gateway.protocol import DEFAULT_PORT, ProtocolError
from gateway.transport.names import local_address
from gateway.usbip.importer import list_devices

from .api import NmosApi
from .client import HttpFailed, http_request
from .connection import Port, receiver_params, sender_params
from .dnssd import DnsSd
from .metrics import NmosMetrics
from .model import NODE_API_VERSION, Interface, NodeFacts, UsbDevice, tai_now
from .registration import Registration, node_txt
from .sdp import Leg, make_sdp
from .state import NodeState

log = logging.getLogger("gateway.nmos")

MAX_BODY = 64 * 1024  # a PATCH, a bulk request or an SDP file is far smaller
DEVICE_POLL = 2.0  # seconds between looks at usbipd's device list (plug, unplug)
SYS_NET = Path("/sys/class/net")
FETCH_TIMEOUT = 2.0  # a Sender's transport file, for an IS-04 target PUT


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _interfaces() -> dict[str, list[str]]:
    """Interface name -> its IP addresses."""
    found: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            found.setdefault(name, []).append(address)
    return found


def _mac(name: str) -> str:
    try:
        mac = (SYS_NET / name / "address").read_text().strip()
    except OSError:
        mac = ""
    parts = mac.split(":")
    if len(parts) != 6:  # no MAC to read: a stable made-up one, locally administered
        digest = zlib.crc32(name.encode()).to_bytes(4, "big")
        parts = [f"{b:02x}" for b in b"\x02\x00" + digest]
    return "-".join(parts).lower()


def _own_address(toward: str = "192.0.2.1") -> str:
    """This host's IPv4 address toward `toward` (by default the rest of the network),
    as the routing table says; no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((toward, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


async def fetch_transport_file(href: str) -> str:
    """A Sender's SDP by its manifest_href (plain HTTP, bounded in time and size)."""
    url = urlsplit(href)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"{href[:100]!r} is not an http:// URL")
    path = url.path + (f"?{url.query}" if url.query else "")
    try:
        status, body = await http_request(
            url.hostname, url.port or 80, "GET", path or "/", timeout=FETCH_TIMEOUT
        )
    except HttpFailed as exc:
        raise OSError(str(exc)) from None
    if status != 200:
        raise ValueError(f"GET {href[:100]} answered {status}")
    return body.decode("utf-8", "replace")


def _interface_of(address: str, table: dict[str, list[str]]) -> str | None:
    for name, ips in table.items():
        if address in ips:
            return name
    return None


class NmosNode:
    """The Node of one gateway; `run` until cancelled."""

    def __init__(
        self,
        gateway: ServerGateway | ClientGateway,
        listening: list[Address],
        *,
        hostname: str | None = None,
    ) -> None:
        self.gateway = gateway
        config: GatewayConfig = gateway.config
        self.settings: NmosSettings = config.nmos
        settings = self.settings
        self.is_sender = isinstance(gateway, ServerGateway)
        role = "server" if self.is_sender else "client"
        hostname = hostname or socket.gethostname()
        host = settings.host or (
            _own_address() if _is_wildcard(settings.listen.host) else settings.listen.host
        )
        table = _interfaces()
        if self.is_sender:
            self.legs = self._sender_legs(listening, host)
            addresses = [leg.host for leg in self.legs]
        else:
            self.legs = []
            # The Receiver's own address (interface_ip): toward the server first.
            server = gateway.config.server.host if isinstance(gateway, ClientGateway) else ""
            try:
                first = _own_address(str(ipaddress.IPv4Address(server)))
            except ValueError:
                first = _own_address()
            others = [a for ips in table.values() for a in ips if ":" not in a]
            addresses = list(dict.fromkeys([first, *others]))
        names = [_interface_of(a, table) or "lo" for a in addresses]
        interfaces = tuple(Interface(n, _mac(n)) for n in dict.fromkeys([*names, "lo"]))
        self.facts = NodeFacts(
            seed=settings.seed or f"{hostname}/{role}",
            role=role,
            label=settings.label or hostname,
            hostname=hostname,
            host=host,
            port=settings.listen.port,
            interfaces=interfaces,
            binding=tuple(names[: max(1, len(self.legs))]) if self.is_sender else (names[0],),
            receiver_classes=settings.usb_classes,
        )
        self.session_id = zlib.crc32(self.facts.id("sender").encode())
        self.sdp_version = 1
        if self.is_sender:
            port = Port(
                "sender",
                [sender_params(leg) for leg in self.legs],
                [{"source_ip": leg.host, "source_port": leg.port} for leg in self.legs],
            )
        else:
            port = self._receiver_port(addresses)
        self.metrics = NmosMetrics(gateway.metrics)
        self.counters: dict[str, int] = {}
        self.registration: Registration | None = None
        self.dnssd: DnsSd | None = None
        self.state = NodeState(
            self.facts, port, on_change=self._on_change, on_activate=self._on_activate
        )
        self._wake = trio.Event()
        self.api = NmosApi(
            self.state,
            transport_file=self.transport_file if self.is_sender else None,
            scheduled=lambda _due: self._wake.set(),
            on_refused=self.metrics.refused,
            fetch=fetch_transport_file,
        )

    def _sender_legs(self, listening: list[Address], host: str) -> list[Leg]:
        """The addresses the Sender's SDP names: `[nmos] legs`, or the first listening
        address (a wildcard one as the Node's host)."""
        chosen = list(self.settings.legs) or listening[:1]
        legs = []
        for address in chosen:
            leg_host = host if _is_wildcard(address.host) else address.host
            port = address.port or (listening[0].port if listening else DEFAULT_PORT)
            legs.append(Leg(leg_host, port))
        if len(legs) > 1 and not self.gateway.config.transport.mptcp:
            log.warning("NMOS: %d Sender legs without [transport] mptcp", len(legs))
        return legs

    def _receiver_port(self, addresses: list[str]) -> Port:
        assert isinstance(self.gateway, ClientGateway)
        server = self.gateway.config.server
        try:
            source_ip: str | None = str(ipaddress.ip_address(server.host))
        except ValueError:
            source_ip = None  # a name: not a transport parameter; /active says null
        legs = 2 if self.gateway.config.transport.mptcp else 1  # TR-10-14: a leg per path
        params = receiver_params(addresses, DEFAULT_PORT)
        initial = {"source_ip": source_ip, "source_port": server.port, "interface_ip": addresses[0]}
        port = Port("receiver", [params] * legs, [dict(initial) for _ in range(legs)])
        # The configured server gateway is where sessions go until a controller says.
        port.staged["master_enable"] = True
        port.active["master_enable"] = True
        return port

    # -- what the APIs serve

    def transport_file(self) -> str:
        return make_sdp(
            self.legs, session_id=self.session_id, version=self.sdp_version, label=self.facts.label
        )

    def _on_change(self, kind: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if self.registration is not None:
            self.registration.changed(kind)

    async def _advertise(self) -> None:
        """Peer-to-peer: the Node's own DNS-SD advertisement (no registry found)."""
        if self.dnssd is not None:
            txt = node_txt(self.counters)
            if self.dnssd.advertised is None or self.dnssd.advertised.properties != {
                k.encode(): v.encode() for k, v in txt.items()
            }:
                await self.dnssd.advertise(
                    f"{self.facts.label}-{self.facts.role}", self.facts.host, self.facts.port, txt
                )

    def _on_activate(self, port: Port) -> None:
        self.metrics.activations.inc()
        if not isinstance(self.gateway, ClientGateway):
            log.info("NMOS: Sender activated (master_enable %s)", port.active["master_enable"])
            return
        active = port.active
        first = active["transport_params"][0]
        if not active["master_enable"] or first.get("source_ip") is None:
            log.info("NMOS: Receiver deactivated: no server gateway")
            self.gateway.reroute(None)
            return
        server = Address(first["source_ip"], first.get("source_port") or DEFAULT_PORT)
        config = self.gateway.config
        # The configured server keeps its configured TLS name; any other is checked
        # against the address the Sender advertises (its certificate must carry it).
        name = config.server_name if server == config.server else server.host
        log.info("NMOS: Receiver connected to %s (sender %s)", server, active["sender_id"])
        self.gateway.reroute(Route(server, name))

    # -- running

    async def run(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        limits = HttpLimits(
            idle_timeout=self.gateway.config.metrics.idle_timeout, max_body=MAX_BODY
        )
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    serve_http,
                    self.gateway.metrics,
                    self.settings.listen,
                    limits=limits,
                    app=self.api,
                    what="NMOS Node and Connection APIs",
                )
            )
            bound = [local_address(listener) for listener in listeners]
            self.gateway.metrics.status_sections["nmos"] = self.status
            self.facts.port = bound[0].port
            if not (_is_wildcard(self.settings.listen.host) or self.settings.host):
                self.facts.host = bound[0].host
            nursery.start_soon(self._activations)
            if self.is_sender and self.settings.publish_devices:
                await self.refresh_devices()
                nursery.start_soon(self._poll_devices)
            if self.settings.registration:
                if self.settings.registry is None:
                    self.dnssd = DnsSd(NODE_API_VERSION)
                    try:
                        await self.dnssd.start()
                    except Exception as exc:  # mDNS unusable here: the APIs still serve
                        log.error("NMOS: no DNS-SD (%s): set [nmos] registry", exc)
                        self.dnssd = None
                self.registration = Registration(
                    self.state,
                    self.settings,
                    dnssd=self.dnssd,
                    advertise=self._advertise,
                    metrics=self.metrics,
                )
                nursery.start_soon(self._register)
            task_status.started(bound)

    def status(self) -> dict[str, object]:
        """The /status section: where the APIs are, the registry, the connection."""
        port = self.state.port
        return {
            "api": self.facts.base,
            "node_id": self.facts.id("node"),
            "registry": None
            if self.registration is None or self.registration.registry is None
            else f"{self.registration.registry.host}:{self.registration.registry.port}",
            self.state.port_kind: {
                "id": self.facts.id(self.state.port_kind),
                "master_enable": port.active["master_enable"],
                "peer": port.active[port.peer_key],
                "transport_params": port.active["transport_params"],
            },
        }

    async def _register(self) -> None:
        assert self.registration is not None
        try:
            await self.registration.run()
        finally:
            if self.dnssd is not None:
                await self.dnssd.close()

    async def _activations(self) -> None:
        """Run each scheduled activation when it falls due."""
        while True:
            due = self.state.port.pending
            if due is None:
                await self._wake.wait()
            else:
                now = tai_now()
                wait = (due[0] - now[0]) + (due[1] - now[1]) / 1e9
                with trio.move_on_after(max(wait, 0)):
                    await self._wake.wait()
                self.state.activate_due(tai_now())
            self._wake = trio.Event()

    async def _poll_devices(self) -> None:
        while True:
            await trio.sleep(DEVICE_POLL)
            await self.refresh_devices()

    async def refresh_devices(self) -> None:
        """The devices the policy lets `[nmos] audience` see, into the Source."""
        gateway = self.gateway
        assert isinstance(gateway, ServerGateway)
        upstream = gateway.config.upstream
        try:
            with trio.fail_after(gateway.config.request_timeout):
                stream = await trio.open_tcp_stream(upstream.host, upstream.port)
                devices = await list_devices(stream, gateway.config.limits)
        except (OSError, ConnectionError, ProtocolError, trio.TooSlowError) as exc:
            log.warning("NMOS: cannot list usbipd's devices at %s: %s", upstream, exc)
            return
        audience = ClientFacts(common_name=self.settings.audience)
        policy = gateway.access.policy.policy
        shown = []
        for exported in devices:
            facts = gateway.access.facts(exported)
            if policy.decide(audience, facts).target is Target.REJECT:
                continue
            info = exported.info
            shown.append(
                UsbDevice(
                    busid=info.busid,
                    device_class=info.device_class,
                    interface_classes=tuple(i.interface_class for i in exported.interfaces),
                    vendor=info.id_vendor,
                    product=info.id_product,
                    serial=facts.serial,
                )
            )
        if self.state.set_devices(shown):
            log.info("NMOS: the Source lists %d device(s)", len(shown))


async def run_nmos(
    gateway: ServerGateway | ClientGateway,
    listeners: list[trio.SocketListener] | list[Address],
    *,
    task_status: trio.TaskStatus[NmosNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The gateway's NMOS Node (its `[nmos]` table), given where the gateway listens."""
    listening = [x if isinstance(x, Address) else local_address(x) for x in listeners]
    node = NmosNode(gateway, listening)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        task_status.started(node)
