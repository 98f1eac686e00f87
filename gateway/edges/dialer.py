"""Reverse mode, server side: dial out to a client gateway and keep connections ready.

For each client gateway, `pool` slots each dial, finish mutual TLS (this gateway the TLS
client, checking the peer's name and chain; the peer checks ours), check the peer's
identity, and wait on `reverse_link.wait_for_claim` until the client gateway hands the
connection to a local `usbip`. The claimed connection becomes a session served exactly as
an accepted one (`ServerGateway.serve_connection`), and the slot dials again at once, so
the next attach finds a connection ready. Failures wait with exponential backoff and
jitter, so a client gateway coming back is not met by every device host at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gateway.config import Address, ReverseDialSettings
from gateway.edges.reverse_link import LinkLost, wait_for_claim
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.reverse import DialResult, ReverseMetrics
from gateway.transport.identity import PeerIdentity
from gateway.transport.names import peer_name
from gateway.transport.sockets import open_tcp, transport_name
from gateway.transport.tls import HandshakeFailed, ReloadableContext, failure_reason, handshake
from gateway.transport.tls_stream import TlsStream

log = logging.getLogger("gateway.edges.dialer")

BACKOFF_FIRST = 0.25


@dataclass(frozen=True)
class Link:
    """A verified connection this gateway dialed."""

    stream: TlsStream
    identity: PeerIdentity
    address: str
    transport: str


# The gateway's side of things: identify a peer (None: refused, logged, audited), and
# serve a claimed link as a session (False: no place for it).
Identify = Callable[[TlsStream, str], PeerIdentity | None]
Adopt = Callable[[Link], bool]


class Backoff:
    """Exponential, capped, with jitter: each wait is drawn from [d/2, d]."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = max(cap, first)
        self.failures = 0

    def next(self) -> float:
        delay = min(self.first * 2**self.failures, self.cap)
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


class Dialer:
    """Keeps `settings.pool` idle connections to one client gateway."""

    def __init__(
        self,
        target: Address,
        settings: ReverseDialSettings,
        tls: ReloadableContext,
        *,
        connect_timeout: float,
        handshake_timeout: float,
        mptcp: bool,
        identify: Identify,
        adopt: Adopt,
        metrics: GatewayMetrics,
        reverse_metrics: ReverseMetrics,
    ) -> None:
        self.target = target
        self.peer = str(target)
        self.name = settings.name or target.host
        self.settings = settings
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.mptcp = mptcp
        self.identify = identify
        self.adopt = adopt
        self.metrics = metrics
        self.reverse_metrics = reverse_metrics
        self.idle = 0
        self.sessions_started = 0
        self.last_error = ""
        self._last_result: DialResult | None = None

    def status(self) -> dict[str, object]:
        return {
            "dialer": "server",
            "client_gateway": self.peer,
            "name": self.name,
            "idle": self.idle,
            "pool": self.settings.pool,
            "sessions_started": self.sessions_started,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        log.info(
            "reverse mode: dialing the client gateway at %s (TLS name %s), %d connections ready",
            self.target,
            self.name,
            self.settings.pool,
        )
        async with trio.open_nursery() as nursery:
            for _ in range(self.settings.pool):
                nursery.start_soon(self._slot)

    async def _slot(self) -> None:
        backoff = Backoff(BACKOFF_FIRST, self.settings.backoff_max)
        while True:
            link = await self._dial()
            if link is None:
                await trio.sleep(backoff.next())
                continue
            claimed = await self._wait(link)
            if claimed:
                backoff.reset()
                self.sessions_started += 1
                if not self.adopt(link):
                    await trio.aclose_forcefully(link.stream)
            else:
                # Closed or silent: the peer may be refusing us, or be gone; either
                # way not a reason to dial in a tight loop.
                await trio.sleep(backoff.next())

    async def _wait(self, link: Link) -> bool:
        """Idle in the pool until claimed (True) or lost (False, closed)."""
        self._set_idle(+1)
        try:
            await wait_for_claim(link.stream, self.settings.keepalive)
        except LinkLost as exc:
            await trio.aclose_forcefully(link.stream)
            # TLS 1.3: a client learns that the server refused its certificate on its
            # first read, which is here. Counted as the handshake failure it is.
            reason = failure_reason(exc.__cause__) if exc.__cause__ is not None else "eof"
            if reason not in ("eof", "other", "timeout"):
                self.metrics.handshake_failed(reason)
                self._failed("handshake_failed", f"the client gateway refused us: {exc}")
                return False
            self.last_error = f"idle connection lost: {exc}"
            self.reverse_metrics.dialed(self.peer, "idle_lost")
            log.info("reverse connection to %s dropped: %s", self.target, exc)
            return False
        except BaseException:
            await trio.aclose_forcefully(link.stream)
            raise
        finally:
            self._set_idle(-1)
        log.debug("reverse connection to %s claimed for a session", self.target)
        return True

    def _set_idle(self, change: int) -> None:
        self.idle += change
        self.reverse_metrics.idle_changed(self.peer, self.idle)

    async def _dial(self) -> Link | None:
        """A connection whose handshake is done and whose peer is identified, or None
        (logged and counted)."""
        try:
            tcp = await open_tcp(
                self.target.host,
                self.target.port,
                connect_timeout=self.connect_timeout,
                mptcp=self.mptcp,
            )
        except OSError as exc:
            self._failed("connect_failed", f"cannot connect: {exc}")
            return None
        address = peer_name(tcp)
        transport = transport_name(tcp)
        stream = TlsStream.over(tcp, self.tls.current, server_hostname=self.name)
        try:
            await handshake(stream, self.handshake_timeout)
        except HandshakeFailed as exc:
            await trio.aclose_forcefully(stream)
            self.metrics.handshake_failed(exc.reason)
            self._failed("handshake_failed", str(exc))
            return None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.metrics.handshake_succeeded()
        identity = self.identify(stream, address)
        if identity is None:
            await trio.aclose_forcefully(stream)
            self._failed("identity_refused", "the client gateway's certificate is no identity")
            return None
        self.reverse_metrics.dialed(self.peer, "connected")
        self._last_result = None
        log.debug("dialed the client gateway %s at %s: %s", identity, self.target, transport)
        return Link(stream, identity, address, transport)

    def _failed(self, result: DialResult, why: str) -> None:
        self.reverse_metrics.dialed(self.peer, result)
        # A peer that stays down is reported once per kind of failure, not per try.
        level = logging.DEBUG if result == self._last_result else logging.WARNING
        log.log(level, "reverse mode: dialing the client gateway at %s: %s", self.target, why)
        self.last_error = why
        self._last_result = result
