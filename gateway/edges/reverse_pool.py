"""Reverse mode, client side: server gateways dial in; their connections wait here.

A dial-in is accepted on its own mutual-TLS listener (this gateway the TLS server), and
enters the pool of one configured server only when all of this holds: the handshake is
done (chain and CRL checked by OpenSSL), the certificate is no authority, it carries the
serverAuth usage (it is a server gateway's: a client certificate cannot pose as one), and
one of its SAN DNS names or URIs is a configured server name. Otherwise it is refused,
logged and counted, and no local `usbip` ever sees it. Each server's pool is bounded
(`pool_max`); the dial-in listener has its own handshake limits.

A local `usbip` connection on a server's own port takes the newest idle connection of
that server (`ServerPool.take`), which is claimed (`reverse_link.claim`) before USB/IP
starts; one that does not answer is dropped and the next is tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import Address, ClientConfig
from gateway.edges.acceptor import Acceptor, Slot
from gateway.edges.reverse_link import LinkLost, claim, keep_alive
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.reverse import DialInRefusal, ReverseMetrics
from gateway.transport.identity import IdentityRefused, PeerIdentity, client_identity
from gateway.transport.names import peer_name
from gateway.transport.sockets import TunedListener, transport_name
from gateway.transport.tls import HandshakeFailed, ReloadableContext, handshake, peer_certificate
from gateway.transport.tls_stream import TlsStream

log = logging.getLogger("gateway.edges.reverse_pool")


class NotAServer(Exception):
    """A verified certificate that is not one of the server gateways accepted here."""

    def __init__(self, reason: DialInRefusal, detail: str) -> None:
        super().__init__(detail)
        self.reason: DialInRefusal = reason


def serves_tls(der: bytes) -> bool:
    """Whether the certificate may act as a TLS server (serverAuth, or no usage limit)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # unrestricted, as OpenSSL reads it
    return ExtendedKeyUsageOID.SERVER_AUTH in usages


def server_name(der: bytes, names: tuple[str, ...]) -> tuple[str, PeerIdentity]:
    """The configured name a dialing server gateway's certificate carries, or NotAServer."""
    try:
        identity = client_identity(der)
    except IdentityRefused as exc:
        raise NotAServer("identity_refused", str(exc)) from exc
    if not serves_tls(der):
        raise NotAServer(
            "not_a_server_certificate",
            f"{identity} has no serverAuth usage: a client certificate, not a server gateway's",
        )
    carried = set(identity.dns_names) | set(identity.uris)
    for name in names:
        if name in carried:
            return name, identity
    raise NotAServer("unknown_server", f"{identity} carries none of the accepted server names")


@dataclass(eq=False)
class _Idle:
    stream: TlsStream
    address: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    taken: bool = False
    lost: bool = False


class ServerPool:
    """The idle dial-ins of one server gateway, newest last."""

    def __init__(
        self, name: str, local: Address, limit: int, keepalive: float, metrics: ReverseMetrics
    ) -> None:
        self.name = name
        self.local = local
        self.limit = limit
        self.keepalive = keepalive
        self.metrics = metrics
        self.idle: list[_Idle] = []
        self._arrived = trio.Event()
        self.dial_ins = 0
        self.sessions = 0

    def status(self) -> dict[str, object]:
        return {
            "dialer": "server",
            "server": self.name,
            "local": str(self.local),
            "idle": len(self.idle),
            "pool_max": self.limit,
            "dial_ins": self.dial_ins,
            "sessions": self.sessions,
        }

    @property
    def full(self) -> bool:
        return len(self.idle) >= self.limit

    async def hold(self, stream: TlsStream, address: str) -> None:
        """Keep a verified dial-in until a session takes it or it is lost (then closed)."""
        entry = _Idle(stream, address)
        self.idle.append(entry)
        self.dial_ins += 1
        self._changed()
        self._arrived.set()
        self._arrived = trio.Event()
        try:
            with entry.scope:
                await keep_alive(stream, self.keepalive)
        except LinkLost as exc:
            entry.lost = True
            log.info(
                "idle connection from server gateway %s (%s) lost: %s", self.name, address, exc
            )
        finally:
            if entry in self.idle:
                self.idle.remove(entry)
                self._changed()
            entry.stopped.set()
            if not entry.taken:
                await trio.aclose_forcefully(stream)

    async def take(self, timeout: float) -> TlsStream | None:
        """A claimed connection of this server for a session, or None after `timeout`."""
        deadline = trio.current_time() + timeout
        while True:
            while not self.idle:
                arrived = self._arrived
                with trio.move_on_at(deadline):
                    await arrived.wait()
                if trio.current_time() >= deadline and not self.idle:
                    return None
            entry = self.idle.pop()  # the newest: the likeliest to be alive
            self._changed()
            entry.taken = True
            entry.scope.cancel()
            with trio.CancelScope(shield=True):  # brief: the keeper stops at once
                await entry.stopped.wait()
            if not entry.lost:
                # One try is bounded apart: a stale connection must leave time for the next.
                left = deadline - trio.current_time()
                try:
                    await claim(entry.stream, max(min(left, max(timeout / 3, 1.0)), 0.1))
                except BaseException as exc:
                    if not isinstance(exc, LinkLost):
                        await trio.aclose_forcefully(entry.stream)
                        raise
                    log.info(
                        "server gateway %s: a pooled connection failed its claim: %s",
                        self.name,
                        exc,
                    )
                else:
                    self.sessions += 1
                    return entry.stream
            await trio.aclose_forcefully(entry.stream)

    def _changed(self) -> None:
        self.metrics.idle_changed(self.name, len(self.idle))


class DialIns:
    """The dial-in listener and the pools of the server gateways it accepts."""

    def __init__(
        self, config: ClientConfig, metrics: GatewayMetrics, alpn: tuple[str, ...]
    ) -> None:
        reverse = config.reverse
        self.config = config
        self.metrics = metrics
        self.names = tuple(name for name, _ in reverse.servers)
        self.reverse_metrics = ReverseMetrics(metrics, self.names)
        # The client gateway's certificate, now as a TLS server: it needs serverAuth.
        self.tls = ReloadableContext.server(
            config.tls.cert,
            config.tls.key,
            config.tls.ca,
            min_version=config.tls.version,
            crl=config.tls.crl,
            alpn=alpn,
        )
        self.pools = {
            name: ServerPool(name, local, reverse.pool_max, reverse.keepalive, self.reverse_metrics)
            for name, local in reverse.servers
        }
        self.acceptor = Acceptor(
            "client gateway dial-ins",
            self.handle,
            # Idle pooled connections are sessions of this acceptor: bounded by the pools.
            max(reverse.pool_max * len(self.pools), 1),
            metrics.connection_refused,
            max_handshakes=config.resources.max_handshakes,
            max_handshakes_per_source=config.resources.max_handshakes_per_source,
        )
        metrics.status_sections["reverse"] = lambda: [p.status() for p in self.pools.values()]

    async def handle(self, tcp: trio.SocketStream, slot: Slot) -> None:
        address = peer_name(tcp)
        stream = TlsStream.over(tcp, self.tls.current, server_side=True)
        try:
            pool = await self._admit(stream, address, slot)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if pool is None:
            await trio.aclose_forcefully(stream)
        else:
            await pool.hold(stream, address)  # closes it unless a session took it

    async def _admit(self, stream: TlsStream, address: str, slot: Slot) -> ServerPool | None:
        """The pool a verified dial-in goes to, or None (refused: counted and logged)."""
        try:
            await handshake(stream, self.config.handshake_timeout)
        except HandshakeFailed as exc:
            self.metrics.handshake_failed(exc.reason)
            self._refused("handshake_failed", address, str(exc))
            return None
        self.metrics.handshake_succeeded()
        if not slot.promote():
            return None
        try:
            name, identity = server_name(peer_certificate(stream), self.names)
        except NotAServer as exc:
            self._refused(exc.reason, address, str(exc))
            return None
        pool = self.pools[name]
        if pool.full:
            self._refused("pool_full", address, f"{name} already has {pool.limit} idle connections")
            return None
        log.debug(
            "server gateway %s (%s) dialed in from %s: %s",
            name,
            identity,
            address,
            transport_name(stream),
        )
        return pool

    def _refused(self, reason: DialInRefusal, address: str, detail: str) -> None:
        self.reverse_metrics.dial_in_refused(reason)
        log.warning("refused a dial-in from %s: %s: %s", address, reason, detail)

    async def run(
        self, listeners: list[TunedListener], *, task_status: trio.TaskStatus[None]
    ) -> None:
        await self.acceptor.run(listeners, task_status=task_status)
