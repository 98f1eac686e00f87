"""Prometheus metrics of one gateway, in a registry of its own.

Several gateways can run in one process (the demo, the tests), so nothing here uses
prometheus_client's global registry. Rare events (handshakes, sessions, op requests,
policy decisions) are ordinary prometheus_client children bound once; the per-URB
numbers are plain integers (`series.py`) turned into metric families when scraped,
and the live sessions are read at that moment for gauges and byte counters.

Labels are bounded: role, transfer_type, direction, result, reason, and the device
only when configured (`metrics.device_label`, capped by `metrics.device_label_limit`).
Never a seqnum, a client address or a serial number.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.accounting.outcome import OutcomeKind
from gateway.accounting.rtt import BUCKETS
from gateway.accounting.series import DeviceLabeler, SeriesTable, SessionMeter
from gateway.accounting.session import Session
from gateway.config import Address, ClientConfig, GatewayRole, MetricsSettings, ServerConfig
from gateway.protocol import DeviceInfo, OpStatus, Role
from gateway.transport.credentials import Expiry
from gateway.transport.identity import IDENTITY_REFUSALS, IdentityRefusal
from gateway.transport.tls import HANDSHAKE_REASONS, HandshakeReason

PREFIX = "usbip_gateway_"
PolicyTarget = Literal["devlist", "import"]
#: Why the HTTP endpoint closed a connection its client had not closed.
HttpCloseReason = Literal["evicted", "idle_timeout", "head_timeout", "write_timeout", "bad_request"]
HTTP_CLOSE_REASONS: tuple[HttpCloseReason, ...] = get_args(HttpCloseReason)


def op_status_label(status: int | None) -> str:
    if status is None:
        return "none"
    try:
        return OpStatus(status).name.lower()
    except ValueError:
        return "unknown"


@dataclass
class UpstreamCheck:
    """The last usbipd reachability check, reused for `interval` seconds."""

    address: Address
    interval: float
    timeout: float
    up: bool | None = None
    checked_at: float = float("-inf")


#: Why a connection was closed unserved (the `limit` label of connections_refused_total).
RefusalLimit = Literal["connections", "handshakes", "handshakes_per_source"]
REFUSAL_LIMITS: tuple[RefusalLimit, ...] = ("connections", "handshakes", "handshakes_per_source")


class BufferTotal(Protocol):
    """What the buffered_bytes gauge reads: the relay's budget (`relay.budget`)."""

    @property
    def total(self) -> int: ...


class GatewayMetrics:
    """Everything one gateway reports: metrics, live sessions, readiness."""

    def __init__(
        self,
        role: GatewayRole,
        settings: MetricsSettings | None = None,
        *,
        tls_min_version: str = "1.3",
        upstream: Address | None = None,
        connect_timeout: float = 1.0,
    ) -> None:
        settings = settings or MetricsSettings()
        self.role: GatewayRole = role
        self.settings = settings
        self.enabled = settings.enabled
        self.labeler = DeviceLabeler(settings.device_label, settings.device_label_limit)
        self.table = SeriesTable()
        self.sessions: dict[int, Session] = {}
        self.listening = False  # set by the gateway once its listeners are open
        self.http_addresses: list[Address] = []
        self.started = time.time()
        self.upstream = (
            UpstreamCheck(upstream, settings.upstream_check_interval, min(connect_timeout, 2.0))
            if upstream is not None
            else None
        )
        self._upstream_lock = trio.Lock()
        self._finished_bytes = {"client": 0, "server": 0}
        self._finished_abandoned = 0
        self._policy: dict[tuple[str, str, str], int] = {}
        # Extra /status sections from what runs beside the gateway (exporter, agent).
        self.status_sections: dict[str, Callable[[], Any]] = {}

        self.registry = registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        Gauge(
            f"{p}build_info",
            "Version and configuration of this gateway (always 1).",
            ["version", "role", "python_version", "tls_min_version", "device_label"],
            registry=registry,
        ).labels(
            __version__, role, platform.python_version(), tls_min_version, settings.device_label
        ).set(1)
        Gauge(
            f"{p}start_time_seconds",
            "When this gateway started, in seconds since the Unix epoch.",
            ["role"],
            registry=registry,
        ).labels(role).set(self.started)

        self._handshakes = Counter(
            f"{p}tls_handshakes",
            "TLS handshakes attempted with a peer, successful or not.",
            ["role"],
            registry=registry,
        ).labels(role)
        failures = Counter(
            f"{p}tls_handshake_failures",
            "TLS handshakes that failed, by bounded reason.",
            ["role", "reason"],
            registry=registry,
        )
        self._handshake_failures = {r: failures.labels(role, r) for r in HANDSHAKE_REASONS}
        identities = Counter(
            f"{p}identity_refusals",
            "Peers whose verified certificate is not an identity (a CA certificate, or "
            "one the identity parser cannot decode), by bounded reason.",
            ["role", "reason"],
            registry=registry,
        )
        self._identity_refusals = {r: identities.labels(role, r) for r in IDENTITY_REFUSALS}

        sessions = Counter(
            f"{p}sessions",
            "Sessions (client connections) ended, by outcome class.",
            ["role", "outcome"],
            registry=registry,
        )
        self._sessions = {kind: sessions.labels(role, kind.label) for kind in OutcomeKind}
        by_transport = Counter(
            f"{p}sessions_by_transport",
            "Sessions ended, by the link between the gateways: transport (tcp, mptcp: "
            "what the connection really ran on) and negotiated compression (none, zstd).",
            ["role", "transport", "compression"],
            registry=registry,
        )
        self._sessions_by_transport = {
            (t, c): by_transport.labels(role, t, c)
            for t in ("tcp", "mptcp")
            for c in ("none", "zstd")
        }
        by_dialer = Counter(
            f"{p}sessions_by_dialer",
            "Sessions ended, by which gateway opened their connection between the gateways: "
            "client (the usual way) or server (reverse mode, the device host dialed out).",
            ["role", "dialer"],
            registry=registry,
        )
        self._sessions_by_dialer = {d: by_dialer.labels(role, d) for d in ("client", "server")}
        self._ops = Counter(
            f"{p}op_requests",
            "USB/IP op requests (devlist, import) by the status of their reply.",
            ["role", "type", "status"],
            registry=registry,
        )
        errors = Counter(
            f"{p}protocol_errors",
            "Sessions closed because one side broke the USB/IP protocol, by that side.",
            ["role", "side"],
            registry=registry,
        )
        self._protocol_errors = {side: errors.labels(role, side.value) for side in Role}
        self._upstream_failures = Counter(
            f"{p}upstream_connect_failures",
            "Failed connections upstream (server role: usbipd; client role: the server gateway).",
            ["role"],
            registry=registry,
        ).labels(role)
        refused = Counter(
            f"{p}connections_refused",
            "Connections closed unserved, by the limit reached: connections "
            "(max_connections sessions open), handshakes (max_handshakes in progress), "
            "handshakes_per_source (max_handshakes_per_source from one address).",
            ["role", "limit"],
            registry=registry,
        )
        self._refused = {limit: refused.labels(role, limit) for limit in REFUSAL_LIMITS}
        self._buffered = Gauge(
            f"{p}buffered_bytes",
            "Bytes of partial frames held by all sessions together (limit: "
            "limits.max_buffered_bytes).",
            ["role"],
            registry=registry,
        ).labels(role)
        http_closed = Counter(
            f"{p}http_connections_closed",
            "Connections to the HTTP endpoint closed by the gateway, by reason: evicted "
            "(the oldest waiting one, to make room at the connection limit), idle_timeout "
            "(no request), head_timeout (request head too slow), write_timeout (response "
            "not read), bad_request (malformed or oversized request).",
            ["role", "reason"],
            registry=registry,
        )
        self._http_closed = {r: http_closed.labels(role, r) for r in HTTP_CLOSE_REASONS}
        self._upstream_up = Gauge(
            f"{p}upstream_up",
            "1 if the last connection or check upstream succeeded, else 0 (-1: not yet known).",
            ["role"],
            registry=registry,
        ).labels(role)
        self._upstream_up.set(-1 if upstream is not None else 1)
        compression = {
            stage: Counter(
                f"{p}compression_{stage}_bytes",
                f"Bytes {'into' if stage == 'input' else 'out of'} the compression layer, by "
                "operation.",
                ["role", "operation"],
                registry=registry,
            )
            for stage in ("input", "output")
        }
        self._compression = {
            (stage, op): family.labels(role, op)
            for stage, family in compression.items()
            for op in ("compress", "decompress")
        }
        registry.register(_ScrapeCollector(self))

    @classmethod
    def for_server(cls, config: ServerConfig) -> GatewayMetrics:
        return cls(
            "server",
            config.metrics,
            tls_min_version=config.tls.min_version,
            upstream=config.upstream,
            connect_timeout=config.connect_timeout,
        )

    @classmethod
    def for_client(cls, config: ClientConfig) -> GatewayMetrics:
        return cls("client", config.metrics, tls_min_version=config.tls.min_version)

    # ---------------------------------------------------------------- events

    def session_started(self, session: Session) -> None:
        self.sessions[session.id] = session
        if self.enabled:
            session.meter = SessionMeter(self.table, self.labeler)

    def session_ended(self, session: Session) -> None:
        """Move the session's counts to the totals; its in-flight URBs stop counting."""
        if self.sessions.pop(session.id, None) is None:
            return
        self._finished_bytes["client"] += session.bytes_from_client
        self._finished_bytes["server"] += session.bytes_from_server
        self._finished_abandoned += max(session.urbs_in_flight, 0)
        outcome = session.outcome
        self._sessions[outcome.kind].inc()
        link = self._sessions_by_transport.get((session.transport, session.compression))
        if link is not None:
            link.inc()
        self._sessions_by_dialer[session.dialer].inc()
        if outcome.side is not None:
            self._protocol_errors[outcome.side].inc()
        if session.request:
            status = op_status_label(session.op_status)
            if session.op_status is None:
                if outcome.kind is OutcomeKind.DENIED:
                    status = "denied"
                elif outcome.kind is OutcomeKind.UPSTREAM_UNREACHABLE:
                    status = "error"
            self._ops.labels(self.role, session.request, status).inc()

    def handshake_succeeded(self) -> None:
        self._handshakes.inc()

    def handshake_failed(self, reason: HandshakeReason) -> None:
        self._handshakes.inc()
        self._handshake_failures.get(reason, self._handshake_failures["other"]).inc()

    def connection_refused(self, limit: RefusalLimit = "connections") -> None:
        """A connection was closed unserved: `limit` was reached."""
        self._refused[limit].inc()

    def track_buffers(self, budget: BufferTotal) -> None:
        """Report `budget`'s total as the buffered_bytes gauge, read when scraped."""
        self._buffered.set_function(lambda: budget.total)

    def track_expiries(self, source: Callable[[], Iterable[Expiry]]) -> None:
        """Report when the gateway's own certificate, its CA and its CRL run out, as
        `source` (the live TLS context's files) says when scraped."""
        self.registry.register(_ExpiryCollector(self.role, source))

    def http_connection_closed(self, reason: HttpCloseReason) -> None:
        self._http_closed[reason].inc()

    def identity_refused(self, reason: IdentityRefusal) -> None:
        self._identity_refusals[reason].inc()

    def upstream_connected(self) -> None:
        self._upstream_up.set(1)

    def upstream_connect_failed(self) -> None:
        self._upstream_failures.inc()
        self._upstream_up.set(0)
        if self.upstream is not None:
            self.upstream.up = False
            self.upstream.checked_at = trio.current_time()

    def record_policy_decision(
        self, target: PolicyTarget, allowed: bool, device: DeviceInfo | str | None = None
    ) -> None:
        """One policy decision: `target` is what was decided on (an import, or one
        DEVLIST entry); the device label (when on) comes from `device`."""
        if target not in ("devlist", "import"):
            raise ValueError(f"policy target {target!r} is not devlist or import")
        if isinstance(device, DeviceInfo):
            label = self.labeler.label(device.busid, device)
        else:
            label = self.labeler.label(device or "")
        key = (target, "allow" if allowed else "deny", label)
        self._policy[key] = self._policy.get(key, 0) + 1

    def compressed(
        self, operation: Literal["compress", "decompress"], n_in: int, n_out: int
    ) -> None:
        self._compression["input", operation].inc(n_in)
        self._compression["output", operation].inc(n_out)

    # ---------------------------------------------------------------- readiness

    async def check_upstream(self) -> bool | None:
        """Is usbipd reachable? A TCP connect, reused for `upstream_check_interval`."""
        check = self.upstream
        if check is None:
            return None
        async with self._upstream_lock:
            now = trio.current_time()
            if check.up is not None and now - check.checked_at < check.interval:
                return check.up
            try:
                with trio.fail_after(check.timeout):
                    stream = await trio.open_tcp_stream(check.address.host, check.address.port)
                await trio.aclose_forcefully(stream)
                check.up = True
            except (OSError, trio.TooSlowError):
                check.up = False
            check.checked_at = trio.current_time()
            self._upstream_up.set(1 if check.up else 0)
            return check.up

    async def ready(self) -> tuple[bool, str]:
        if not self.listening:
            return False, "not listening yet"
        up = await self.check_upstream()
        if up is False:
            assert self.upstream is not None
            return False, f"usbipd at {self.upstream.address} unreachable"
        return True, "ready"

    # ---------------------------------------------------------------- output

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def status(self) -> dict[str, Any]:
        """The /status document: this gateway and each live session."""
        return {
            "role": self.role,
            "version": __version__,
            "started": self.started,
            "listening": self.listening,
            "upstream_up": None if self.upstream is None else self.upstream.up,
            "sessions": [_session_status(s) for s in list(self.sessions.values())],
        } | {name: section() for name, section in self.status_sections.items()}


def _session_status(session: Session) -> dict[str, Any]:
    meter = session.meter
    p50 = p99 = None
    samples = 0
    if meter is not None:
        samples = meter.rtt.samples
        p50, p99 = meter.rtt.quantile(0.5), meter.rtt.quantile(0.99)
    return {
        "id": session.id,
        "role": session.role,
        "identity": session.peer,
        "address": session.address,
        "request": session.request,
        "busid": session.busid,
        "device": session.device,
        "started": session.started,
        "bytes_from_client": session.bytes_from_client,
        "bytes_from_server": session.bytes_from_server,
        "urbs": session.urbs_submitted,
        "urbs_failed": session.urbs_failed,
        "urbs_unlinked": session.urbs_unlinked,
        "in_flight": session.urbs_in_flight,
        "rtt_samples": samples,
        "rtt_p50_seconds": p50,
        "rtt_p99_seconds": p99,
        "transport": session.transport,
        "compression": session.compression,
        "dialer": session.dialer,
    }


_LE = (*(floatToGoString(b) for b in BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class _ScrapeCollector(Collector):
    """The families built at scrape time from URB series and live sessions."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(describe=True))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(describe=False))

    def _families(self, *, describe: bool) -> Iterator[Metric]:
        m = self.m
        role = m.role
        device = ["device"] if m.labeler.enabled else []
        urb_labels = ["role", "transfer_type", "direction", *device]
        rtt = HistogramMetricFamily(
            f"{PREFIX}urb_rtt_seconds",
            "URB round-trip time: CMD_SUBMIT seen to RET_SUBMIT seen. The client role "
            "measures network, server gateway, usbipd and device; the server role "
            "usbipd and device.",
            labels=urb_labels,
        )
        urbs = CounterMetricFamily(
            f"{PREFIX}urbs",
            "URBs ended, by result: ok, error (RET_SUBMIT status < 0), unlinked.",
            labels=[*urb_labels, "result"],
        )
        data = CounterMetricFamily(
            f"{PREFIX}urb_data_bytes",
            "USB data bytes moved by completed URBs (actual_length), by direction.",
            labels=urb_labels,
        )
        iso_packets = CounterMetricFamily(
            f"{PREFIX}iso_packets",
            "Isochronous packets in completed URBs.",
            labels=urb_labels,
        )
        iso_errors = CounterMetricFamily(
            f"{PREFIX}iso_packet_errors",
            "Isochronous packets completed with an error status (or RET_SUBMIT error_count).",
            labels=urb_labels,
        )
        policy = CounterMetricFamily(
            f"{PREFIX}policy_decisions",
            "Policy decisions, by target (import, devlist entry) and decision.",
            labels=["role", "target", "decision", *device],
        )
        if not describe:
            for dev, transfer_type, direction, s in m.table.items():
                labels = [role, transfer_type, direction, *([dev] if device else [])]
                cumulative, buckets = 0, []
                for le, count in zip(_LE, s.buckets, strict=True):
                    cumulative += count
                    buckets.append((le, float(cumulative)))
                rtt.add_metric(labels, buckets, s.rtt_sum)
                urbs.add_metric([*labels, "ok"], s.ok)
                urbs.add_metric([*labels, "error"], s.error)
                urbs.add_metric([*labels, "unlinked"], s.unlinked)
                data.add_metric(labels, s.data_bytes)
                if transfer_type == "isochronous":
                    iso_packets.add_metric(labels, s.iso_packets)
                    iso_errors.add_metric(labels, s.iso_errors)
            for (target, decision, dev), count in m._policy.items():
                policy.add_metric([role, target, decision, *([dev] if device else [])], count)
        yield from (rtt, urbs, data, iso_packets, iso_errors, policy)

        sessions = list(m.sessions.values())
        in_flight = GaugeMetricFamily(
            f"{PREFIX}urbs_in_flight",
            "URBs submitted and not yet answered, over the live sessions.",
            labels=["role"],
        )
        abandoned = CounterMetricFamily(
            f"{PREFIX}urbs_abandoned",
            "URBs still in flight when their session ended.",
            labels=["role"],
        )
        active = GaugeMetricFamily(
            f"{PREFIX}sessions_active", "Sessions open now.", labels=["role"]
        )
        relayed = CounterMetricFamily(
            f"{PREFIX}relayed_bytes",
            "USB/IP bytes relayed (headers and data), by the side that sent them.",
            labels=["role", "sender"],
        )
        if not describe:
            in_flight.add_metric([role], sum(s.urbs_in_flight for s in sessions))
            abandoned.add_metric([role], m._finished_abandoned)
            active.add_metric([role], len(sessions))
            relayed.add_metric(
                [role, "client"],
                m._finished_bytes["client"] + sum(s.bytes_from_client for s in sessions),
            )
            relayed.add_metric(
                [role, "server"],
                m._finished_bytes["server"] + sum(s.bytes_from_server for s in sessions),
            )
        yield from (in_flight, abandoned, active, relayed)


class _ExpiryCollector(Collector):
    """`certificate_expiry_timestamp_seconds`, read from the files in force when scraped."""

    def __init__(self, role: GatewayRole, source: Callable[[], Iterable[Expiry]]) -> None:
        self.role = role
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for expiry in self.source():
            family.add_metric([self.role, expiry.kind], expiry.not_after.timestamp())
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{PREFIX}certificate_expiry_timestamp_seconds",
            "When the TLS files in force stop being valid, in seconds since the Unix epoch, "
            "by certificate: own (this gateway's), ca (the earliest in the CA file), crl (its "
            "nextUpdate: after it every client is refused).",
            labels=["role", "certificate"],
        )
