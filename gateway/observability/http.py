"""The HTTP/1.1 endpoint, on h11 in the gateway's own Trio loop: /metrics, /healthz,
/readyz and /status (see `endpoints.py` for what each answers).

Built so that liveness cannot be starved: the connection table never stops accepting (at
its limit the oldest connection still waiting for a request is closed, `connections.py`);
a connection that sends nothing is closed after `idle_timeout`; a request head must be
whole within `head_timeout` and `max_head` bytes; an answer must be taken within
`write_timeout`; keep-alive serves at most `max_requests`. GET and HEAD only, unless
an `App` answers instead (the NMOS APIs): then a request body of at most `max_body` bytes
is read, within the same `head_timeout`. Nothing blocks the relay: building /metrics is a
bounded amount of in-process work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus

import h11
import trio

from gateway.config import Address
from gateway.transport.names import local_address, peer_name
from gateway.transport.sockets import ListenError

from .connections import ConnectionTable, Slot
from .endpoints import TEXT, respond
from .metrics import GatewayMetrics, HttpCloseReason

__all__ = [
    "Answer",
    "App",
    "HttpEndpoint",
    "HttpLimits",
    "Request",
    "respond",
    "serve_http",
    "start_http",
]

log = logging.getLogger("gateway.http")

RECEIVE_SIZE = 16 * 1024
LINGER_TIMEOUT = 1.0  # after the last answer: at most this long ...
LINGER_BYTES = 64 * 1024  # ... reading at most this much of what the client still sends


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-endpoint and per-connection bounds (seconds and bytes)."""

    max_connections: int = 32  # at the limit the oldest waiting connection is closed
    idle_timeout: float = 5.0  # no byte of a request for this long: closed, unanswered
    head_timeout: float = 10.0  # a whole request head within this long, else 408
    write_timeout: float = 10.0  # an answer not taken by the client within this long
    max_head: int = 8 * 1024  # request line and headers, else 431
    max_requests: int = 100  # per connection; the last answer says Connection: close
    max_body: int = 0  # request body bytes read for an App, else 413 (0: never read)


@dataclass(frozen=True, slots=True)
class Request:
    """One request, for an `App`: header names lower case, the body whole."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    headers: Sequence[tuple[str, str]] = field(default_factory=tuple)


# Answers every request of an endpoint in place of /metrics and the others.
App = Callable[[Request], Awaitable[Answer]]


class _BodyTooLarge(Exception):
    """A request body over `max_body`."""


class _Idle(Exception):
    """No byte of a request within the idle timeout."""


class HttpEndpoint:
    """One listening address's connections: what they may see, and their limits."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        status: bool,
        limits: HttpLimits,
        app: App | None = None,
    ) -> None:
        self.metrics = metrics
        self.status = status
        self.limits = limits
        self.app = app
        self.table = ConnectionTable(limits.max_connections)

    async def handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve one connection until either side closes it."""
        slot = self.table.admit()
        try:
            with slot.scope:
                await self._converse(stream, slot)
            if slot.evicted and not slot.closing:
                self._gave_up(stream, slot, "evicted")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            self.table.release(slot)
            await trio.aclose_forcefully(stream)

    def _gave_up(self, stream: trio.abc.Stream, slot: Slot, reason: HttpCloseReason) -> None:
        """Count and log a connection the gateway closes (before the client can see it)."""
        slot.closing = True
        self.metrics.http_connection_closed(reason)
        peer = peer_name(stream) if isinstance(stream, trio.SocketStream) else "a peer"
        log.info("HTTP connection from %s closed: %s", peer, reason.replace("_", " "))

    async def _converse(self, stream: trio.abc.HalfCloseableStream, slot: Slot) -> None:
        """Requests and answers until either side closes."""
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        for served in range(1, limits.max_requests + 1):
            slot.answering = False
            try:
                request = await self._next_request(stream, conn)
            except _Idle:
                self._gave_up(stream, slot, "idle_timeout")
                return
            except trio.TooSlowError:
                self._gave_up(stream, slot, "head_timeout")
                await self._fail(stream, conn, 408, b"request timeout\n")
                return
            except h11.RemoteProtocolError as exc:
                self._gave_up(stream, slot, "bad_request")
                status = exc.error_status_hint
                await self._fail(stream, conn, status, HTTPStatus(status).phrase.encode() + b"\n")
                return
            if request is None:
                return
            slot.answering = True
            # h11 checked the syntax; latin-1 maps any byte, so an odd target is a 404.
            method, target = request.method.decode("latin-1"), request.target.decode("latin-1")
            extra: Sequence[tuple[str, str]] = ()
            if self.app is None:
                # A request body is not read: answer, then close rather than parse past it.
                try:
                    has_body = not isinstance(conn.next_event(), h11.EndOfMessage)
                except h11.RemoteProtocolError:
                    has_body = True
                status, content_type, body = await respond(
                    self.metrics, method, target, status=self.status
                )
            else:
                has_body = False
                try:
                    content = await self._read_body(stream, conn)
                except _BodyTooLarge:
                    self._gave_up(stream, slot, "bad_request")
                    await self._fail(stream, conn, 413, b"request body too large\n")
                    return
                except trio.TooSlowError:
                    self._gave_up(stream, slot, "head_timeout")
                    await self._fail(stream, conn, 408, b"request timeout\n")
                    return
                except h11.RemoteProtocolError:
                    self._gave_up(stream, slot, "bad_request")
                    await self._fail(stream, conn, 400, b"bad request\n")
                    return
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
                }
                answer = await self.app(Request(method, target, headers, content))
                status, content_type, body, extra = (
                    answer.status,
                    answer.content_type,
                    answer.body,
                    answer.headers,
                )
            close = has_body or served == limits.max_requests
            try:
                await self._send(
                    stream,
                    conn,
                    status,
                    content_type,
                    body,
                    method=method,
                    close=close,
                    extra=extra,
                )
            except trio.TooSlowError:
                self._gave_up(stream, slot, "write_timeout")
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        slot.answering = False
        slot.closing = True
        await self._linger(stream)

    async def _next_request(
        self, stream: trio.abc.ReceiveStream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request head; None if the client closed between requests."""
        started = bool(conn.trailing_data[0])  # pipelined bytes already count as a start
        with trio.fail_after(self.limits.head_timeout):
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    return None
                if event is not h11.NEED_DATA:
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)
                if started:
                    data = await stream.receive_some(RECEIVE_SIZE)
                else:
                    with trio.move_on_after(self.limits.idle_timeout):
                        data = await stream.receive_some(RECEIVE_SIZE)
                        started = True
                    if not started:
                        raise _Idle
                conn.receive_data(bytes(data))

    async def _read_body(self, stream: trio.abc.ReceiveStream, conn: h11.Connection) -> bytes:
        """The request's body, whole, within the head timeout and `max_body` bytes."""
        body = bytearray()
        with trio.fail_after(self.limits.head_timeout):
            while True:
                event = conn.next_event()
                if isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limits.max_body:
                        raise _BodyTooLarge
                elif event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                else:
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)

    async def _send(
        self,
        stream: trio.abc.SendStream,
        conn: h11.Connection,
        status: int,
        content_type: str,
        body: bytes,
        *,
        method: str = "GET",
        close: bool,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
        if status == 405 and not any(name.lower() == "allow" for name, _ in extra):
            headers.append(("Allow", "GET, HEAD"))
        if close:
            headers.append(("Connection", "close"))
        reason = HTTPStatus(status).phrase
        events: list[h11.Event] = [h11.Response(status_code=status, headers=headers, reason=reason)]
        if method != "HEAD":
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        data = b"".join(conn.send(event) or b"" for event in events)
        with trio.fail_after(self.limits.write_timeout):
            await stream.send_all(data)

    async def _fail(
        self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, status: int, body: bytes
    ) -> None:
        """Answer a request that cannot be served, then close."""
        try:
            await self._send(stream, conn, status, TEXT, body, close=True)
        except (h11.LocalProtocolError, trio.TooSlowError):
            return  # too late to answer: close without one
        await self._linger(stream)

    async def _linger(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Read what the client still sends before closing, so that closing with unread
        data does not reset the connection before the client has read the answer."""
        await stream.send_eof()
        with trio.move_on_after(LINGER_TIMEOUT):
            drained = 0
            while drained < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_SIZE)):
                drained += len(chunk)


async def serve_http(
    metrics: GatewayMetrics,
    address: Address,
    *,
    status: bool = True,
    limits: HttpLimits | None = None,
    app: App | None = None,
    what: str = "",
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints on `address` until cancelled; `metrics.http_addresses` says
    where (useful with port 0). `status=False`: /status answers 404. With `app`, it
    answers every request instead (`what` names it in the log) and the address is not
    added to `metrics.http_addresses`."""
    limits = limits or HttpLimits(idle_timeout=metrics.settings.idle_timeout)
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise ListenError(str(address), exc) from exc
    for listener in listeners:
        bound = local_address(listener)
        if app is None:
            metrics.http_addresses.append(bound)
            what = "metrics, health and status" if status else "metrics and health"
        log.info("%s on http://%s/", what, bound)
    task_status.started(listeners)
    endpoint = HttpEndpoint(metrics, status=status, limits=limits, app=app)
    await trio.serve_listeners(endpoint.handle, listeners)


async def start_http(nursery: trio.Nursery, metrics: GatewayMetrics) -> None:
    """Start the endpoints `metrics.settings` asks for: `listen` (with /status unless
    `status` is false) and `status_listen` (with /status)."""
    settings = metrics.settings
    if settings.listen is not None:
        await nursery.start(partial(serve_http, metrics, settings.listen, status=settings.status))
    if settings.status_listen is not None:
        await nursery.start(partial(serve_http, metrics, settings.status_listen, status=True))
