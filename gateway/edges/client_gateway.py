"""The client gateway: plain USB/IP on loopback in, mutual TLS to a server gateway out.

The unmodified `usbip list/attach` tools and vhci-hcd talk to it as if it were usbipd.
Each of their connections gets its own TLS connection, relayed frame by frame.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from gateway.accounting.outcome import Outcome, OutcomeKind
from gateway.accounting.session import Session
from gateway.config import ClientConfig, is_loopback
from gateway.edges.acceptor import Acceptor, Slot
from gateway.edges.gateway import Gateway
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import Splice
from gateway.relay.budget import BufferBudget
from gateway.relay.pumps import IdleTimeouts, close_all, log_session_end, relay
from gateway.transport.compression import alpn_protocols, compress_if_negotiated
from gateway.transport.credentials import read_revocations
from gateway.transport.identity import IdentityRefused, PeerIdentity
from gateway.transport.names import local_name, peer_name
from gateway.transport.sockets import (
    TunedListener,
    open_tcp,
    open_tcp_listeners,
    transport_name,
)
from gateway.transport.tls import (
    HandshakeFailed,
    ReloadableContext,
    handshake,
    peer_identity,
)
from gateway.transport.tls_stream import TlsStream

log = logging.getLogger("gateway.edges.client_gateway")


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
            listeners.extend(await open_tcp_listeners(address.host, address.port))
        return listeners

    def _describe(self, listener: TunedListener) -> str:
        return (
            f"{local_name(listener)} (plain USB/IP), server gateway {self.config.server} "
            f"(TLS name {self.config.server_name})"
        )

    async def connect(self) -> TlsStream:
        """A verified mutual-TLS connection to the server gateway."""
        server = self.config.server
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
        stream = TlsStream.over(tcp, self.tls.current, server_hostname=self.config.server_name)
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
        self.sessions[session.id] = session
        self.metrics.session_started(session)
        try:
            try:
                server_link = await self.connect()
            except HandshakeFailed as exc:
                session.outcome = Outcome(
                    OutcomeKind.TLS_FAILED, f"TLS to {self.config.server} failed: {exc}"
                )
                await trio.aclose_forcefully(stream)
                return
            except (OSError, trio.TooSlowError) as exc:
                session.outcome = Outcome(
                    OutcomeKind.UPSTREAM_UNREACHABLE,
                    f"server gateway {self.config.server} unreachable: {exc or 'timeout'}",
                )
                await trio.aclose_forcefully(stream)
                return
            try:
                server_identity = peer_identity(server_link)
            except IdentityRefused as exc:
                # Only an undecodable certificate: a server's may be a CA's (the client
                # checks it names the server, which is what matters here).
                self.metrics.identity_refused(exc.reason)
                session.outcome = Outcome(
                    OutcomeKind.TLS_FAILED, f"TLS to {self.config.server} failed: {exc}"
                )
                await trio.aclose_forcefully(server_link)
                return
            session.peer = str(server_identity)
            session.transport = transport_name(server_link)
            link = compress_if_negotiated(
                server_link, level=self.config.compression.level, on_bytes=self.metrics.compressed
            )
            session.compression = "none" if link is server_link else "zstd"
            log.debug(
                "session %d to %s: %s, compression %s",
                session.id,
                session.peer,
                session.transport,
                session.compression,
            )
            with trio.CancelScope() as scope:
                linked = Linked(session, server_identity, scope)
                self.linked[session.id] = linked
                try:
                    await relay(
                        Splice(self.config.limits),
                        stream,
                        link,
                        session,
                        budget=self.buffers,
                        idle=IdleTimeouts(
                            self.config.op_idle_timeout, self.config.attached_idle_timeout
                        ),
                    )
                finally:
                    del self.linked[session.id]
            if linked.revoked is not None:
                session.outcome = linked.revoked
        finally:
            await close_all(stream)
            del self.sessions[session.id]
            self.metrics.session_ended(session)
            log_session_end(log, session)
