"""Accepting connections for either gateway: connection limits, and draining on stop.

Like `trio.serve_listeners`, but the accept loops and the connection handlers live in
separate scopes, so a drain can stop accepting while open sessions carry on (ghostunnel's
SIGTERM behaviour), and the number of connections in hand is known and capped.

A connection starts in the handshake pool (`max_handshakes`, at most
`max_handshakes_per_source` from one IP address) and moves to the session pool
(`max_connections`) when its handler calls `Slot.promote()`, once its TLS handshake is
done: connections that never finish a handshake cannot take the places of sessions.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from gateway.observability.metrics import RefusalLimit
from gateway.transport.names import peer_name
from gateway.transport.sockets import TunedListener

log = logging.getLogger("gateway.edges.acceptor")

# Out of file descriptors or memory: wait a little instead of spinning (as trio does).
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
_REFUSAL_LOG_INTERVAL = 5.0

# Which limit refused a connection: a metric label.


class Slot:
    """One accepted connection's place: in the handshake pool until `promote()`."""

    def __init__(self, acceptor: Acceptor, source: str) -> None:
        self._acceptor = acceptor
        self.source = source
        self.established = False

    def promote(self) -> bool:
        """Move to the session pool; False (refused, counted and logged) if it is full."""
        return self._acceptor.promote(self)


Handler = Callable[[trio.SocketStream, Slot], Awaitable[None]]


class Acceptor:
    """Runs the accept loops and the handlers; `drain()` stops the first, awaits the second."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        max_connections: int,
        on_refused: Callable[[RefusalLimit], None] | None = None,
        *,
        max_handshakes: int = 128,
        max_handshakes_per_source: int = 16,
    ) -> None:
        self.name = name
        self._handler = handler
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_source = max_handshakes_per_source
        self._on_refused = on_refused
        self.active = 0  # connections in hand, either pool
        self.established = 0  # of which in the session pool
        self._handshaking: Counter[str] = Counter()  # source address -> connections
        self.refused = 0
        self.internal_errors = 0
        self._refused_logged_at = -_REFUSAL_LOG_INTERVAL
        self._refused_since_log = 0
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()

    async def run(
        self,
        listeners: Sequence[TunedListener],
        *,
        sources: Sequence[Callable[[], Awaitable[None]]] = (),
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on `listeners`; `sources` are other loops that bring connections (the
        reverse dialer), stopped by a drain like the accept loops."""
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            with self._accepting:
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(self._accept_loop, listener)
                    for source in sources:
                        loops.start_soon(source)
                    task_status.started()
            log.info("%s: stopped accepting, %d connections open", self.name, self.active)

    async def wait_idle(self) -> None:
        """Until no connection is in hand (each one's handler has returned)."""
        await self._idle.wait()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to `timeout` s for open connections; True if all ended.

        On timeout the remaining connections are cancelled.
        """
        self._accepting.cancel()
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        log.warning(
            "%s: %d connections still open after %gs, closing them", self.name, self.active, timeout
        )
        if self._handlers is not None:
            self._handlers.cancel_scope.cancel()
        return False

    async def _accept_loop(self, listener: TunedListener) -> None:
        async with listener:  # closed however the loop ends, cancellation included
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_ERRNOS:
                        raise
                    log.error("%s: accept failed (%s), retrying", self.name, exc)
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                source = source_address(stream)
                limit = self._over_limit(source)
                if limit is not None:
                    self._refuse(limit, peer_name(stream))
                    stream.socket.close()  # at once: the peer sees it immediately
                    continue
                assert self._handlers is not None
                slot = Slot(self, source)
                self._handshaking[source] += 1  # before the handler runs: no race
                self._handlers.start_soon(self._run_handler, stream, slot)

    @property
    def handshaking(self) -> int:
        """Connections in the handshake pool."""
        return self.active_handshakes()

    def active_handshakes(self, source: str | None = None) -> int:
        if source is None:
            return sum(self._handshaking.values())
        return self._handshaking.get(source, 0)

    def _over_limit(self, source: str) -> RefusalLimit | None:
        if self.established >= self.max_connections:
            return "connections"  # no session could follow the handshake
        if self.handshaking >= self.max_handshakes:
            return "handshakes"
        if self._handshaking.get(source, 0) >= self.max_handshakes_per_source:
            return "handshakes_per_source"
        return None

    def promote(self, slot: Slot) -> bool:
        """`slot` joins the session pool (`Slot.promote`)."""
        if slot.established:
            return True
        if self.established >= self.max_connections:
            self._refuse("connections", slot.source)
            return False
        self._release_handshake(slot.source)
        slot.established = True
        self.established += 1
        return True

    def _release_handshake(self, source: str) -> None:
        self._handshaking[source] -= 1
        if self._handshaking[source] <= 0:
            del self._handshaking[source]

    def _refuse(self, limit: RefusalLimit, peer: str) -> None:
        """At a limit: count, and log sparingly (a flood must not flood the log)."""
        self.refused += 1
        self._refused_since_log += 1
        if self._on_refused is not None:
            self._on_refused(limit)
        now = trio.current_time()
        if now - self._refused_logged_at >= _REFUSAL_LOG_INTERVAL:
            value = {
                "connections": self.max_connections,
                "handshakes": self.max_handshakes,
                "handshakes_per_source": self.max_handshakes_per_source,
            }[limit]
            log.warning(
                "%s: limit max_%s = %d reached, refused %s (%d refused since last report)",
                self.name,
                limit,
                value,
                peer,
                self._refused_since_log,
            )
            self._refused_logged_at = now
            self._refused_since_log = 0

    def adopt(self, serve: Callable[[], Awaitable[None]], peer: str) -> bool:
        """Serve a connection that came from elsewhere than a listener (one this gateway
        dialed, its handshake done) in the session pool, drained like accepted ones.
        False: refused, counted and logged (the pool is full), or not running."""
        if self._handlers is None or self._accepting.cancel_called:
            return False
        if self.established >= self.max_connections:
            self._refuse("connections", peer)
            return False
        self.established += 1
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        self._handlers.start_soon(self._run_adopted, serve)
        return True

    async def _run_adopted(self, serve: Callable[[], Awaitable[None]]) -> None:
        try:
            await serve()
        except Exception:
            self.internal_errors += 1
            log.exception("%s: internal error in a connection handler", self.name)
        finally:
            self.established -= 1
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def _run_handler(self, stream: trio.SocketStream, slot: Slot) -> None:
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            await self._handler(stream, slot)
        except Exception:
            # A bug in one session must not end the others: log it and close this one.
            self.internal_errors += 1
            log.exception("%s: internal error in a connection handler", self.name)
        finally:
            # Whatever the handler did (or was cancelled while doing), the socket goes.
            await trio.aclose_forcefully(stream)
            if slot.established:
                self.established -= 1
            else:
                self._release_handshake(slot.source)
            self.active -= 1
            if self.active == 0:
                self._idle.set()


def source_address(stream: trio.SocketStream) -> str:
    """The peer's IP address (no port): what the per-source handshake limit counts."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown"  # already reset: it will fail at once anyway
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
