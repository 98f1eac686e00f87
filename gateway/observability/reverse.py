"""Metrics of reverse connections (a server gateway that dials out to a client gateway)."""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import Counter, Gauge

from gateway.observability.metrics import PREFIX, GatewayMetrics

# Bounded on purpose: these are metric labels.
DialResult = Literal[
    "connected", "connect_failed", "handshake_failed", "identity_refused", "idle_lost"
]
DIAL_RESULTS: tuple[DialResult, ...] = get_args(DialResult)
DialInRefusal = Literal[
    "handshake_failed",
    "identity_refused",
    "not_a_server_certificate",
    "unknown_server",
    "pool_full",
]
DIAL_IN_REFUSALS: tuple[DialInRefusal, ...] = get_args(DialInRefusal)


class ReverseMetrics:
    """Idle pooled connections per peer, dials by result (server) and refused dial-ins by
    reason (client); registered with the gateway's own metrics."""

    def __init__(self, metrics: GatewayMetrics, peers: tuple[str, ...]) -> None:
        role = metrics.role
        registry = metrics.registry
        idle = Gauge(
            f"{PREFIX}reverse_idle_connections",
            "Reverse connections open and waiting for a session, by peer (server role: the "
            "client gateway dialed; client role: the configured server name).",
            ["role", "peer"],
            registry=registry,
        )
        self._idle = {peer: idle.labels(role, peer) for peer in peers}
        dials = Counter(
            f"{PREFIX}reverse_dials",
            "Connections this server gateway dialed out, by result.",
            ["role", "peer", "result"],
            registry=registry,
        )
        self._dials = {
            (peer, result): dials.labels(role, peer, result)
            for peer in (peers if role == "server" else ())
            for result in DIAL_RESULTS
        }
        refused = Counter(
            f"{PREFIX}reverse_dial_ins_refused",
            "Connections dialed in to this client gateway and refused before any local "
            "usbip saw them, by reason.",
            ["role", "reason"],
            registry=registry,
        )
        self._refused = {
            reason: refused.labels(role, reason)
            for reason in (DIAL_IN_REFUSALS if role == "client" else ())
        }

    def idle_changed(self, peer: str, count: int) -> None:
        self._idle[peer].set(count)

    def dialed(self, peer: str, result: DialResult) -> None:
        self._dials[peer, result].inc()

    def dial_in_refused(self, reason: DialInRefusal) -> None:
        self._refused[reason].inc()
