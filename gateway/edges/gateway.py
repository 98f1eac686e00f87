"""What both gateways do alike: listen, serve their HTTP endpoint, reload TLS files, accept
through the acceptor, and drain on shutdown. Each gateway says how it listens, what it
runs beside the acceptor, and what it does after draining."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import trio

from gateway.config import GatewayConfig
from gateway.edges.acceptor import Acceptor
from gateway.edges.expiry import ExpiryWarnings, watch_expiry
from gateway.edges.reconfigure import take_reloadable
from gateway.edges.reloading import reload_tls, tls_files, watch_tls
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
    expiry: ExpiryWarnings

    def _track_expiry(self) -> None:
        """Export the TLS files' expiry times and warn ahead of them (in __init__)."""
        self.expiry = ExpiryWarnings(dt.timedelta(days=self.config.tls.expiry_warning))
        self.metrics.track_expiries(lambda: self.tls.expiries)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._open_listeners()
        try:
            async with trio.open_nursery() as nursery:
                await self._start_services(nursery)
                await start_http(nursery, self.metrics)
                nursery.start_soon(watch_expiry, self.expiry, lambda: self.tls.expiries)
                if self.config.tls.watch:
                    # Every context is built from the same files: one watch reloads them all.
                    nursery.start_soon(watch_tls, self.tls, self.config.tls, self.reload_tls)
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

    def reload(self, config: Config | None = None) -> None:
        """What SIGHUP does: the TLS files, from the paths in `config` if given (the
        configuration file reread), then what the gateway reloads besides."""
        self.reload_tls(config)
        self._reload_more(config)

    def reload_tls(self, config: Config | None = None) -> bool:
        """New TLS files for new connections (a bad file keeps the old ones); then the
        expiry check, and what the gateway does with the new files."""
        files = None if config is None else tls_files(config.tls)
        # Every context, even after one failed: each keeps its old files if its new fail.
        reloaded = [reload_tls(tls, files) for tls in self.tls_contexts()]
        if not all(reloaded):
            return False
        if config is not None:
            self.config = take_reloadable(self.config, config, "tls")
        self.expiry.window = dt.timedelta(days=self.config.tls.expiry_warning)
        self.expiry.check(self.tls.expiries)
        self._tls_reloaded()
        return True

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

    def _tls_reloaded(self) -> None:
        """After new TLS files are in force (nothing by default)."""

    def _reload_more(self, config: Config | None) -> None:
        """What else SIGHUP reloads (nothing by default)."""
