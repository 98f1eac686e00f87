"""The client gateway: plain USB/IP on loopback in, mutual TLS to a server gateway out.

The unmodified `usbip list/attach` tools and vhci-hcd talk to it as if it were usbipd.
Each of their connections gets its own TLS connection, relayed frame by frame.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import suppress
from dataclasses import dataclass

import trio

from gateway.accounting.outcome import Outcome, OutcomeKind, protocol_error
from gateway.accounting.session import Session
from gateway.config import Address, ClientConfig, is_loopback
from gateway.edges.acceptor import Acceptor, Slot
from gateway.edges.gateway import Gateway
from gateway.edges.reverse_pool import DialIns, ServerPool
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import (
    ConnectionClosed,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Phase,
    ProtocolError,
    Role,
    Splice,
)
from gateway.relay.budget import BufferBudget
from gateway.relay.pumps import IdleTimeouts, close_all, log_session_end, receive_frame, relay
from gateway.transport.compression import alpn_protocols, compress_if_negotiated
from gateway.transport.credentials import read_revocations
from gateway.transport.identity import IdentityRefused, PeerIdentity
from gateway.transport.names import local_address, local_name, peer_name
from gateway.transport.sockets import (
    TunedListener,
    close_listeners,
    open_tcp,
    open_tcp_listeners,
    transport_name,
)
from gateway.transport.tls import (
    HandshakeFailed,
    HandshakeReason,
    ReloadableContext,
    failure_reason,
    handshake,
    peer_identity,
)
from gateway.transport.tls_stream import TlsStream

log = logging.getLogger("gateway.edges.client_gateway")


@dataclass(frozen=True, slots=True)
class Route:
    """The server gateway new sessions go to, and the name its certificate must carry."""

    server: Address
    server_name: str


@dataclass(eq=False)
class Linked:
    """A session relayed to the server gateway, and whose certificate that one showed."""

    session: Session
    server: PeerIdentity
    scope: trio.CancelScope
    revoked: Outcome | None = None


class ClientGateway(Gateway[ClientConfig]):
    log = log

    def __init__(self, config: ClientConfig, *, tls: ReloadableContext | None = None) -> None:
        self.config = config
        self.tls = tls or ReloadableContext.client(
            config.tls.cert,
            config.tls.key,
            config.tls.ca,
            min_version=config.tls.version,
            crl=config.tls.crl,
            alpn=alpn_protocols(config.compression.enabled),
        )
        self.sessions: dict[int, Session] = {}
        # Where sessions go; an NMOS activation may change it, or switch it off (None).
        self.route: Route | None = Route(config.server, config.server_name)
        self._scopes: dict[int, trio.CancelScope] = {}
        self.linked: dict[int, Linked] = {}
        self.metrics = GatewayMetrics.for_client(config)
        self.buffers = BufferBudget(config.resources.max_buffered_bytes)
        self.metrics.track_buffers(self.buffers)
        self._track_expiry()
        self.acceptor = Acceptor(
            "client gateway",
            self.handle,
            config.max_connections,
            self.metrics.connection_refused,
            max_handshakes=config.resources.max_handshakes,
            max_handshakes_per_source=config.resources.max_handshakes_per_source,
        )
        # Reverse mode: server gateways that dial in, each served on its own local port.
        self.dial_ins: DialIns | None = None
        if config.reverse.listen is not None and config.reverse.servers:
            alpn = alpn_protocols(config.compression.enabled)
            self.dial_ins = DialIns(config, self.metrics, alpn)
        elif config.reverse.listen is not None or config.reverse.servers:
            log.warning("reverse mode needs both reverse.listen and reverse.servers: off")
        self._by_port: dict[int, ServerPool] = {}
        self.reverse_addresses: dict[str, Address] = {}
        self.dial_in_addresses: list[Address] = []

    def tls_contexts(self) -> list[ReloadableContext]:
        return [self.tls] + ([self.dial_ins.tls] if self.dial_ins else [])

    def _tls_reloaded(self) -> None:
        """Sessions through a server gateway whose certificate the CRL now revokes are
        closed: the certificate's key may be in other hands."""
        crl = self.tls.files.crl
        if crl is None or not self.linked:
            return
        revocations = read_revocations(crl, self.tls.files.ca)
        for linked in list(self.linked.values()):
            if revocations.revokes(linked.server):
                why = (
                    f"server certificate revoked (serial {linked.server.serial:x} in the CRL "
                    f"{os.fspath(crl)})"
                )
                log.warning("closing session %d: %s", linked.session.id, why)
                linked.revoked = Outcome(OutcomeKind.DENIED, why)
                linked.scope.cancel()

    async def _start_services(self, nursery: trio.Nursery) -> None:
        if self.dial_ins is None:
            return
        address = self.config.reverse.listen
        assert address is not None
        listeners = await open_tcp_listeners(
            address.host, address.port, mptcp=self.config.transport.mptcp
        )
        self.dial_in_addresses = [local_address(listener) for listener in listeners]
        await nursery.start(self.dial_ins.run, listeners)
        for where in self.dial_in_addresses:
            log.info("listening on %s (mutual TLS) for server gateways dialing in", where)

    async def _after_drain(self) -> None:
        if self.dial_ins is not None:
            await self.dial_ins.acceptor.drain(0)  # idle pooled connections: closed at once

    async def _open_listeners(self) -> list[TunedListener]:
        listeners: list[TunedListener] = []
        for address in self.config.listen:
            if not is_loopback(address.host):
                # Plain USB/IP has no authentication: say so loudly when exposed.
                log.warning(
                    "listening on non-loopback %s: anyone who reaches it can attach "
                    "devices with this gateway's identity",
                    address,
                )
            try:
                listeners.extend(await open_tcp_listeners(address.host, address.port))
            except BaseException:
                await close_listeners(listeners)  # those of the addresses before
                raise
        try:
            await self._open_reverse_listeners(listeners)
        except BaseException:
            await close_listeners(listeners)
            raise
        return listeners

    async def _open_reverse_listeners(self, listeners: list[TunedListener]) -> None:
        """Each reverse server's own port, after `listeners`: a connection is told apart
        by the port it came in on."""
        taken = {local_address(listener).port for listener in listeners}
        for pool in self.dial_ins.pools.values() if self.dial_ins else ():
            opened = await open_tcp_listeners(pool.local.host, pool.local.port)
            listeners.extend(opened)
            for listener in opened:
                bound = local_address(listener)
                if bound.port in taken - {p for p, q in self._by_port.items() if q is pool}:
                    raise OSError(f"reverse.servers: port {bound.port} is used twice")
                taken.add(bound.port)
                self._by_port[bound.port] = pool
                self.reverse_addresses.setdefault(pool.name, bound)

    def _describe(self, listener: TunedListener) -> str:
        pool = self._by_port.get(local_address(listener).port)
        if pool is not None:
            return (
                f"{local_name(listener)} (plain USB/IP), server gateway {pool.name} "
                "(it dials in: reverse mode)"
            )
        return (
            f"{local_name(listener)} (plain USB/IP), server gateway {self.config.server} "
            f"(TLS name {self.config.server_name})"
        )

    def reroute(self, route: Route | None) -> None:
        """Send new sessions along `route` (None: refuse them). A change closes the open
        sessions, which detaches their devices: they belonged to the old route."""
        if route == self.route:
            return
        log.info(
            "server gateway now %s; closing %d open session(s)",
            "none" if route is None else f"{route.server} (TLS name {route.server_name})",
            len(self._scopes),
        )
        self.route = route
        for scope in self._scopes.values():
            scope.cancel()

    def _server_text(self) -> str:
        return "none" if self.route is None else str(self.route.server)

    async def connect(self) -> TlsStream:
        """A verified mutual-TLS connection to the server gateway."""
        route = self.route
        if route is None:
            raise OSError("no server gateway: the route is switched off")
        server = route.server
        try:
            tcp = await open_tcp(
                server.host,
                server.port,
                connect_timeout=self.config.connect_timeout,
                mptcp=self.config.transport.mptcp,
            )
        except (OSError, trio.TooSlowError):
            self.metrics.upstream_connect_failed()
            raise
        self.metrics.upstream_connected()
        stream = TlsStream.over(tcp, self.tls.current, server_hostname=route.server_name)
        try:
            await handshake(stream, self.config.handshake_timeout)
        except HandshakeFailed as exc:
            self.metrics.handshake_failed(exc.reason)
            await trio.aclose_forcefully(stream)
            raise
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.metrics.handshake_succeeded()
        return stream

    async def handle(self, stream: trio.SocketStream, slot: Slot) -> None:
        # Local USB/IP has no handshake: a session from the start.
        if not slot.promote():
            return
        session = Session("client", "", peer_name(stream), time.time())
        pool = self._pool_of(stream)
        self.sessions[session.id] = session
        self.metrics.session_started(session)
        splice = Splice(self.config.limits, cut_through=True)
        server: object = self._server_text() if pool is None else pool.name
        link: trio.abc.Stream | None = None
        linked: Linked | None = None
        scope = trio.CancelScope()
        if pool is None:  # a reverse server's sessions do not follow the route
            self._scopes[session.id] = scope
        try:
            with scope:
                try:
                    if pool is None:
                        server_link = await self.connect()
                    else:
                        session.dialer = "server"
                        server_link = await self._take(pool)
                except HandshakeFailed as exc:
                    why = f"TLS to {server} failed: {exc}{_hint(exc.reason, self.config)}"
                    await self._answer_failure(stream, splice, session, OutcomeKind.TLS_FAILED, why)
                    return
                except (OSError, trio.TooSlowError) as exc:
                    why = f"server gateway {server} unreachable: {exc or 'timeout'}"
                    await self._answer_failure(
                        stream, splice, session, OutcomeKind.UPSTREAM_UNREACHABLE, why
                    )
                    return
                except NoDialIn as exc:
                    await self._answer_failure(
                        stream, splice, session, OutcomeKind.UPSTREAM_UNREACHABLE, str(exc)
                    )
                    return
                try:
                    server_identity = peer_identity(server_link)
                except IdentityRefused as exc:
                    # Only an undecodable certificate: a server's may be a CA's (the client
                    # checks it names the server, which is what matters here).
                    self.metrics.identity_refused(exc.reason)
                    await trio.aclose_forcefully(server_link)
                    why = f"TLS to {server} failed: {exc}"
                    await self._answer_failure(stream, splice, session, OutcomeKind.TLS_FAILED, why)
                    return
                session.peer = str(server_identity)
                session.transport = transport_name(server_link)
                link = compress_if_negotiated(
                    server_link,
                    level=self.config.compression.level,
                    on_bytes=self.metrics.compressed,
                )
                session.compression = "none" if link is server_link else "zstd"
                log.debug(
                    "session %d to %s (connection dialed by the %s gateway): %s, compression %s",
                    session.id,
                    session.peer,
                    session.dialer,
                    session.transport,
                    session.compression,
                )
                if await self._op_exchange(stream, link, splice, session, server):
                    linked = Linked(session, server_identity, scope)
                    self.linked[session.id] = linked
                    try:
                        await relay(
                            splice,
                            stream,
                            link,
                            session,
                            budget=self.buffers,
                            # The op phase is behind us (bounded by op_idle_timeout).
                            idle=IdleTimeouts(attached=self.config.attached_idle_timeout),
                        )
                    finally:
                        del self.linked[session.id]
            if linked is not None and linked.revoked is not None:
                session.outcome = linked.revoked
            elif scope.cancelled_caught:
                session.outcome = Outcome(
                    OutcomeKind.CLOSED, "the route to the server gateway changed"
                )
        finally:
            self._scopes.pop(session.id, None)
            await close_all(stream, *([link] if link is not None else []))
            del self.sessions[session.id]
            self.metrics.session_ended(session)
            log_session_end(log, session)

    def _pool_of(self, stream: trio.SocketStream) -> ServerPool | None:
        """The reverse server whose local port `stream` came in on (None: forward)."""
        if not self._by_port:
            return None
        try:
            port = stream.socket.getsockname()[1]
        except OSError:
            return None
        return self._by_port.get(port)

    async def _take(self, pool: ServerPool) -> TlsStream:
        timeout = self.config.reverse.claim_timeout
        link = await pool.take(timeout)
        if link is None:
            self.metrics.upstream_connect_failed()
            raise NoDialIn(
                f"server gateway {pool.name}: no dialed-in connection answered within {timeout:g}s"
            )
        self.metrics.upstream_connected()
        return link

    async def _op_exchange(
        self,
        local: trio.abc.Stream,
        link: trio.abc.Stream,
        splice: Splice,
        session: Session,
        server: object,
    ) -> bool:
        """The op request and its reply, here in Trio: a server gateway that refuses this
        gateway (its certificate) says so on the first read, and the local tool must be
        told with a failed reply, not a closed connection it reports as success. True:
        an import succeeded and the URB phase follows."""
        idle = self.config.op_idle_timeout
        try:
            with trio.fail_after(idle):
                request = await receive_frame(splice, Role.CLIENT, local)
        except trio.TooSlowError:
            session.outcome = Outcome(
                OutcomeKind.TIMEOUT, f"idle: no traffic for {idle:g}s in the op phase"
            )
            return False
        except ProtocolError as exc:
            session.outcome = protocol_error(Role.CLIENT, exc)
            return False
        except _LOST:
            session.outcome = Outcome(
                OutcomeKind.CONNECTION_LOST, "connection lost before the request"
            )
            return False
        if isinstance(request, ConnectionClosed):
            session.outcome = Outcome(OutcomeKind.CLOSED, "closed by client")
            return False
        if splice.buffered(Role.CLIENT):
            # The tools speak again only after the reply: nothing of this is forwarded.
            session.outcome = protocol_error(
                Role.CLIENT,
                f"{splice.buffered(Role.CLIENT)} bytes after the op request, before its reply",
            )
            return False
        session.observe(Role.CLIENT, request, trio.current_time())
        try:
            await link.send_all(request.raw)
            with trio.fail_after(idle):
                reply = await receive_frame(splice, Role.SERVER, link)
        except trio.TooSlowError:
            failure = Outcome(OutcomeKind.TIMEOUT, f"no reply from {server} within {idle:g}s")
        except ProtocolError as exc:
            failure = protocol_error(Role.SERVER, exc)
        except (*_LOST, OSError) as exc:
            reason = failure_reason(exc)
            if reason in ("eof", "other"):
                failure = Outcome(
                    OutcomeKind.CONNECTION_LOST,
                    f"server gateway {server} closed the connection before replying",
                )
            else:
                self.metrics.handshake_failed(reason)
                failure = Outcome(
                    OutcomeKind.TLS_FAILED,
                    f"TLS to {server} failed: the server gateway refused this gateway: "
                    f"{reason}{_hint(reason, self.config)}",
                )
        else:
            if isinstance(reply, ConnectionClosed):
                failure = Outcome(
                    OutcomeKind.CONNECTION_LOST,
                    f"server gateway {server} closed the connection before replying",
                )
            else:
                session.observe(Role.SERVER, reply, trio.current_time())
                with suppress(*_LOST):
                    await local.send_all(reply.raw)
                if splice.phase is Phase.URB:
                    return True
                if isinstance(reply.event, OpReplyDevlist):
                    session.outcome = Outcome(
                        OutcomeKind.LISTED, f"listed {len(reply.event.devices)} devices"
                    )
                return False
        session.outcome = failure
        await _send_error_reply(local, request.event)
        return False

    async def _answer_failure(
        self,
        local: trio.abc.Stream,
        splice: Splice,
        session: Session,
        kind: OutcomeKind,
        why: str,
    ) -> None:
        """The server gateway cannot be had: answer the local request (it is usually
        there already) with a failed reply, so `usbip` reports a failure."""
        session.outcome = Outcome(kind, why)
        with suppress(ProtocolError, *_LOST), trio.move_on_after(self.config.op_idle_timeout):
            request = await receive_frame(splice, Role.CLIENT, local)
            if not isinstance(request, ConnectionClosed):
                session.observe(Role.CLIENT, request, trio.current_time())
                await _send_error_reply(local, request.event)


class NoDialIn(Exception):
    """No connection of a reverse-mode server gateway was there to take."""


_LOST = (trio.BrokenResourceError, trio.ClosedResourceError)

# What to look at, by why the TLS connection between the gateways failed.
_HINTS: dict[HandshakeReason, str] = {
    "hostname_mismatch": "the server's certificate does not carry the name {name}: set "
    "--server-name (client.server_name) to a name it carries "
    "(`usbip-gateway certs show CERT` lists them)",
    "unknown_ca": "one gateway's certificate is not from the CA the other trusts "
    "(tls.ca, --ca, on each side)",
    "certificate_expired": "a certificate has expired (`usbip-gateway certs show CERT`)",
    "certificate_revoked": "this gateway's certificate is revoked (the server's tls.crl)",
    "no_certificate": "the server gateway wants this gateway's certificate (--cert, --key)",
    "bad_certificate": "the server gateway refused this gateway's certificate (see its log)",
    "protocol_version": "the gateways share no TLS version (tls.min_version)",
    "not_tls": "{server} does not speak TLS: is it the server gateway, not usbipd?",
    "timeout": "no handshake within handshake_timeout: is {server} the server gateway?",
}


def _hint(reason: HandshakeReason, config: ClientConfig) -> str:
    hint = _HINTS.get(reason)
    return "" if hint is None else "; " + hint.format(name=config.server_name, server=config.server)


async def _send_error_reply(local: trio.abc.Stream, request: object) -> None:
    """A failed reply to `request`: `usbip` reports it ("Unexpected response"), where a
    bare close would be reported as "Request Completed Successfully"."""
    reply = (
        OpReplyImport(OpStatus.ERROR)
        if isinstance(request, OpRequestImport)
        else OpReplyDevlist(status=OpStatus.ERROR)
    )
    with suppress(*_LOST):
        await local.send_all(reply.encode())
