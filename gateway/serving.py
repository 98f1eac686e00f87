"""Accepting connections for either gateway: a connection limit, and draining on stop.

Like `trio.serve_listeners`, but the accept loops and the connection handlers live in
separate scopes, so a drain can stop accepting while open sessions carry on (ghostunnel's
SIGTERM behaviour), and the number of connections in hand is known and capped.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from gateway.transport.names import peer_name
from gateway.transport.sockets import TunedListener

log = logging.getLogger("gateway.serving")

# Out of file descriptors or memory: wait a little instead of spinning (as trio does).
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
_REFUSAL_LOG_INTERVAL = 5.0

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class Acceptor:
    """Runs the accept loops and the handlers; `drain()` stops the first, awaits the second."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        max_connections: int,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._handler = handler
        self.max_connections = max_connections
        self._on_refused = on_refused
        self.active = 0
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
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            with self._accepting:
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(self._accept_loop, listener)
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
                if self.active >= self.max_connections:
                    self._refuse(stream)
                    continue
                assert self._handlers is not None
                self._handlers.start_soon(self._run_handler, stream)

    def _refuse(self, stream: trio.SocketStream) -> None:
        """At the limit: close at once (the peer sees it immediately), count, log sparingly."""
        self.refused += 1
        self._refused_since_log += 1
        if self._on_refused is not None:
            self._on_refused()
        now = trio.current_time()
        if now - self._refused_logged_at >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "%s: connection limit %d reached, refused %s (%d refused since last report)",
                self.name,
                self.max_connections,
                peer_name(stream),
                self._refused_since_log,
            )
            self._refused_logged_at = now
            self._refused_since_log = 0
        stream.socket.close()

    async def _run_handler(self, stream: trio.SocketStream) -> None:
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        try:
            await self._handler(stream)
        except Exception:
            # A bug in one session must not end the others: log it and close this one.
            self.internal_errors += 1
            log.exception("%s: internal error in a connection handler", self.name)
        finally:
            # Whatever the handler did (or was cancelled while doing), the socket goes.
            await trio.aclose_forcefully(stream)
            self.active -= 1
            if self.active == 0:
                self._idle.set()
