"""What both gateways do alike: listen, serve their HTTP endpoint, reload TLS files, accept
through the acceptor, and drain on shutdown. Each gateway says how it listens, what it
runs beside the acceptor, and what it does after draining."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import trio

from gateway.config import GatewayConfig
from gateway.edges.acceptor import Acceptor
from gateway.edges.reloading import watch_tls
from gateway.observability.http import start_http
from gateway.observability.metrics import GatewayMetrics
from gateway.transport.sockets import TunedListener, close_listeners
from gateway.transport.tls import ReloadableContext

Config = TypeVar("Config", bound=GatewayConfig)


class Gateway(Generic[Config]):
    """The serve/shutdown skeleton; `ServerGateway` and `ClientGateway` fill it in."""

    config: Config
    tls: ReloadableContext
    metrics: GatewayMetrics
    acceptor: Acceptor
    log: logging.Logger

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._open_listeners()
        try:
            async with trio.open_nursery() as nursery:
                await self._start_services(nursery)
                await start_http(nursery, self.metrics)
                if self.config.tls.watch:
                    for tls in self.tls_contexts():
                        nursery.start_soon(watch_tls, tls, self.config.tls)
                await nursery.start(
                    partial(self.acceptor.run, listeners, sources=self._connection_sources())
                )
                self.metrics.listening = True
                for listener in listeners:
                    self.log.info("listening on %s", self._describe(listener))
                task_status.started(listeners)
        finally:
            # Also when something beside them failed to start (a metrics port in use).
            await close_listeners(listeners)

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, let open sessions end (up to the shutdown timeout), then what
        the gateway does last; True if every session ended by itself."""
        clean = await self.acceptor.drain(
            self.config.shutdown_timeout if timeout is None else timeout
        )
        await self._after_drain()
        return clean

    async def wait_idle(self) -> None:
        """Until no connection is open (each one logged and counted)."""
        await self.acceptor.wait_idle()

    def tls_contexts(self) -> list[ReloadableContext]:
        """Every TLS context built from the certificate files (reloaded together)."""
        return [self.tls]

    # -- what each gateway says

    async def _open_listeners(self) -> list[TunedListener]:
        raise NotImplementedError

    def _describe(self, listener: TunedListener) -> str:
        raise NotImplementedError

    def _connection_sources(self) -> Sequence[Callable[[], Awaitable[None]]]:
        """Loops that bring connections besides the listeners (none by default)."""
        return ()

    async def _start_services(self, nursery: trio.Nursery) -> None:
        """Tasks that run beside the acceptor (none by default)."""

    async def _after_drain(self) -> None:
        """What follows the drain (nothing by default)."""
