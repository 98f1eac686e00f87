"""The server gateway: mutual TLS in, the kernel's usbipd on loopback out.

Per connection: handshake (bounded), the client's identity from its certificate, the
op request read and judged before usbipd is contacted, then one usbipd connection
relayed frame by frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Protocol

import trio

from gateway.config import ServerConfig
from gateway.observability.http import serve_http
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import (
    ConnectionClosed,
    ExportedDevice,
    Frame,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    ProtocolError,
    Role,
    Splice,
)
from gateway.relay import close_all, log_session_end, receive_frame, relay
from gateway.session import Session
from gateway.transport.names import local_name, peer_name
from gateway.transport.sockets import TunedListener, open_tcp, open_tcp_listeners
from gateway.transport.tls import (
    HandshakeFailed,
    PeerIdentity,
    ReloadableContext,
    handshake,
    peer_identity,
)

log = logging.getLogger("gateway.server")


class Authorizer(Protocol):
    """Who may see and import what. The default allows everything."""

    def import_refusal(self, identity: PeerIdentity, busid: str) -> OpStatus | None:
        """None to allow; else the status to answer with (usbipd is not contacted)."""

    def visible(
        self, identity: PeerIdentity, devices: Sequence[ExportedDevice]
    ) -> tuple[ExportedDevice, ...]:
        """The DEVLIST entries this client may see."""


class AllowAll:
    def import_refusal(self, identity: PeerIdentity, busid: str) -> OpStatus | None:
        return None

    def visible(
        self, identity: PeerIdentity, devices: Sequence[ExportedDevice]
    ) -> tuple[ExportedDevice, ...]:
        return tuple(devices)


class ServerGateway:
    def __init__(
        self,
        config: ServerConfig,
        *,
        tls: ReloadableContext | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.config = config
        self.tls = tls or ReloadableContext.server(
            config.tls.cert, config.tls.key, config.tls.ca, min_version=config.tls.version
        )
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.sessions: dict[int, Session] = {}
        self.metrics = GatewayMetrics.for_server(config)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[TunedListener] = []
        for address in self.config.listen:
            listeners.extend(await open_tcp_listeners(address.host, address.port))
        for listener in listeners:
            log.info(
                "listening on %s (mutual TLS), usbipd at %s",
                local_name(listener),
                self.config.upstream,
            )
        async with trio.open_nursery() as nursery:
            if self.config.metrics.listen is not None:
                await nursery.start(serve_http, self.metrics, self.config.metrics.listen)
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            self.metrics.listening = True
            task_status.started(listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        address = peer_name(stream)
        tls_stream = trio.SSLStream(stream, self.tls.current, server_side=True)
        try:
            await handshake(tls_stream, self.config.handshake_timeout)
        except HandshakeFailed as exc:
            self.metrics.handshake_failed(exc.reason)
            log.warning("TLS handshake from %s failed: %s", address, exc)
            await trio.aclose_forcefully(tls_stream)
            return
        self.metrics.handshake_succeeded()
        identity = peer_identity(tls_stream)
        session = Session("server", str(identity), address, time.time())
        self.sessions[session.id] = session
        self.metrics.session_started(session)
        try:
            await self._serve_session(tls_stream, identity, session)
        finally:
            del self.sessions[session.id]
            self.metrics.session_ended(session)
            log_session_end(log, session)

    async def _serve_session(
        self, client: trio.SSLStream[trio.SocketStream], identity: PeerIdentity, session: Session
    ) -> None:
        splice = Splice(self.config.limits)
        try:
            with trio.fail_after(self.config.request_timeout):
                request = await receive_frame(splice, Role.CLIENT, client)
        except trio.TooSlowError:
            session.outcome = f"no request within {self.config.request_timeout:g}s"
        except ProtocolError as exc:
            session.outcome = f"protocol error from client: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            session.outcome = "connection lost before the request"
        else:
            if isinstance(request, ConnectionClosed):
                session.outcome = "closed by client before a request"
            else:
                session.observe(Role.CLIENT, request, trio.current_time())
                await self._answer(client, identity, session, splice, request)
                return
        await close_all(client)

    async def _answer(
        self,
        client: trio.SSLStream[trio.SocketStream],
        identity: PeerIdentity,
        session: Session,
        splice: Splice,
        request: Frame,
    ) -> None:
        event = request.event
        if isinstance(event, OpRequestImport):
            status = self.authorizer.import_refusal(identity, event.busid)
            if status is not None:
                session.outcome = f"import refused by policy (status {status.name})"
                await self._refuse(client, splice, OpReplyImport(status))
                return
        upstream = await self._connect_upstream(session)
        if upstream is None:
            refusal = (
                OpReplyImport(OpStatus.ERROR)
                if isinstance(event, OpRequestImport)
                else OpReplyDevlist(status=OpStatus.ERROR)
            )
            await self._refuse(client, splice, refusal)
            return
        try:
            await upstream.send_all(request.raw)
            if isinstance(event, OpRequestDevlist):
                await self._devlist(client, upstream, identity, session, splice)
            else:
                await relay(splice, client, upstream, session)
        except ProtocolError as exc:
            session.outcome = f"protocol error from usbipd: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.outcome = f"connection lost: {exc}"
        finally:
            await close_all(client, upstream)

    async def _devlist(
        self,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        identity: PeerIdentity,
        session: Session,
        splice: Splice,
    ) -> None:
        with trio.fail_after(self.config.request_timeout):
            reply = await receive_frame(splice, Role.SERVER, upstream)
        if isinstance(reply, ConnectionClosed):
            session.outcome = "usbipd closed without a DEVLIST reply"
            return
        session.observe(Role.SERVER, reply, trio.current_time())
        assert isinstance(reply.event, OpReplyDevlist)
        shown = self.authorizer.visible(identity, reply.event.devices)
        data = (
            reply.raw
            if len(shown) == len(reply.event.devices)
            else splice.replace(reply, OpReplyDevlist(shown))
        )
        await client.send_all(data)
        session.outcome = f"listed {len(shown)} of {len(reply.event.devices)} devices"

    async def _connect_upstream(self, session: Session) -> trio.SocketStream | None:
        up = self.config.upstream
        try:
            stream = await open_tcp(up.host, up.port, connect_timeout=self.config.connect_timeout)
        except (OSError, trio.TooSlowError) as exc:
            self.metrics.upstream_connect_failed()
            session.outcome = f"usbipd at {up} unreachable: {exc or 'timeout'}"
            log.error("cannot reach usbipd at %s: %s", up, exc or "timeout")
            return None
        self.metrics.upstream_connected()
        return stream

    async def _refuse(
        self, client: trio.abc.Stream, splice: Splice, reply: OpReplyImport | OpReplyDevlist
    ) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await client.send_all(splice.inject(Role.SERVER, reply))
        await close_all(client)
