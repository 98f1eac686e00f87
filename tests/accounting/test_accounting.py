"""URB accounting from frames built by the codec: RTT, results, bytes, ISO, in flight."""

from __future__ import annotations

import pytest

from gateway.accounting.outcome import Outcome, OutcomeKind, protocol_error
from gateway.accounting.rtt import BUCKETS, FINE_BOUNDS, coarse_index, fine_index, quantile
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import (
    ECONNRESET,
    CmdUnlink,
    Direction,
    IsoPacket,
    LocalProtocolError,
    OpRequestDevlist,
    OpRequestImport,
    RetUnlink,
    Role,
)

from ..observability.helpers import Wire, new_metrics, sample
from ..protocol.helpers import device

BULK = {"role": "server", "transfer_type": "bulk"}
EPIPE, EXDEV = 32, 18


def rtt_count(m: GatewayMetrics, **labels: str) -> float | None:
    return sample(m, "usbip_gateway_urb_rtt_seconds_count", **labels)


def urbs(m: GatewayMetrics, result: str, **labels: str) -> float | None:
    return sample(m, "usbip_gateway_urbs_total", result=result, **labels)


def in_flight(m: GatewayMetrics) -> float | None:
    return sample(m, "usbip_gateway_urbs_in_flight", role=m.role)


@pytest.fixture
def metrics() -> GatewayMetrics:
    return new_metrics()


@pytest.fixture
def wire(metrics: GatewayMetrics) -> Wire:
    w = Wire(metrics)
    w.import_device()
    return w


def test_buckets_span_20us_to_10s_and_nest() -> None:
    assert BUCKETS[0] == pytest.approx(20e-6)
    assert BUCKETS[-1] == pytest.approx(10.48576)
    assert set(BUCKETS) <= set(FINE_BOUNDS)
    for rtt in (1e-6, 20e-6, 21e-6, 40e-6, 3.3e-4, 0.5, 10.0, 10.48576, 11.0, 1e4):
        coarse = coarse_index(fine_index(rtt))
        assert coarse == len(BUCKETS) or rtt <= BUCKETS[coarse]
        assert coarse == 0 or rtt > BUCKETS[coarse - 1]


def test_completed_bulk_in_urb(metrics: GatewayMetrics, wire: Wire) -> None:
    seq = wire.seqnum()
    wire.submit(seq, 1, Direction.IN, 4096, now=10.0)
    assert in_flight(metrics) == 1
    wire.complete(seq, now=10.0003, data=bytes(1000))
    labels = {**BULK, "direction": "in"}
    assert rtt_count(metrics, **labels) == 1
    assert sample(metrics, "usbip_gateway_urb_rtt_seconds_sum", **labels) == pytest.approx(3e-4)
    bucket = "usbip_gateway_urb_rtt_seconds_bucket"
    assert sample(metrics, bucket, le="0.00016", **labels) == 0
    assert sample(metrics, bucket, le="0.00032", **labels) == 1
    assert sample(metrics, bucket, le="+Inf", **labels) == 1
    assert urbs(metrics, "ok", **labels) == 1
    assert urbs(metrics, "error", **labels) == 0
    assert sample(metrics, "usbip_gateway_urb_data_bytes_total", **labels) == 1000
    assert in_flight(metrics) == 0
    # The enumeration's GET_DESCRIPTOR counts as a control IN URB.
    assert urbs(metrics, "ok", role="server", transfer_type="control", direction="in") == 1
    # The session's own sketch gives its percentiles for /status.
    assert wire.session.meter is not None
    assert wire.session.meter.rtt.samples == 2  # with the GET_DESCRIPTOR's 0 s
    assert wire.session.meter.rtt.quantile(0.99) == pytest.approx(3e-4, rel=0.2)
    assert wire.session.meter.rtt.quantile(0.25) == pytest.approx(20e-6, rel=0.2)


def test_failed_urb_counts_as_error_with_its_rtt(metrics: GatewayMetrics, wire: Wire) -> None:
    seq = wire.seqnum()
    wire.submit(seq, 2, Direction.OUT, 512, now=1.0)
    wire.complete(seq, now=1.002, status=-EPIPE)
    labels = {**BULK, "direction": "out"}
    assert urbs(metrics, "error", **labels) == 1
    assert urbs(metrics, "ok", **labels) == 0
    assert rtt_count(metrics, **labels) == 1
    assert wire.session.urbs_failed == 1


def test_unlinked_pending_urb_gets_no_rtt_sample(metrics: GatewayMetrics, wire: Wire) -> None:
    seq, unlink = wire.seqnum(), wire.seqnum()
    wire.submit(seq, 1, Direction.IN, 512, now=5.0)
    wire.send(Role.CLIENT, CmdUnlink(unlink, seq, wire.info.devid), now=9.0)
    assert in_flight(metrics) == 1
    frame = wire.send(Role.SERVER, RetUnlink(unlink, -ECONNRESET), now=9.001)
    assert frame.urb is not None
    labels = {**BULK, "direction": "in"}
    assert urbs(metrics, "unlinked", **labels) == 1
    assert urbs(metrics, "ok", **labels) == 0
    assert rtt_count(metrics, **labels) == 0
    assert in_flight(metrics) == 0
    assert wire.session.urbs_unlinked == 1


def test_unlink_after_completion_counts_the_completion_once(
    metrics: GatewayMetrics, wire: Wire
) -> None:
    seq, unlink = wire.seqnum(), wire.seqnum()
    wire.submit(seq, 1, Direction.IN, 512, now=1.0)
    wire.complete(seq, now=1.001, data=bytes(512))
    wire.send(Role.CLIENT, CmdUnlink(unlink, seq, wire.info.devid), now=1.002)
    frame = wire.send(Role.SERVER, RetUnlink(unlink, 0), now=1.003)
    assert frame.urb is None
    labels = {**BULK, "direction": "in"}
    assert urbs(metrics, "ok", **labels) == 1
    assert urbs(metrics, "unlinked", **labels) == 0
    assert rtt_count(metrics, **labels) == 1
    assert in_flight(metrics) == 0


def test_unlink_racing_the_completion(metrics: GatewayMetrics, wire: Wire) -> None:
    """CMD_UNLINK sent, but the URB completed first: RET_SUBMIT then RET_UNLINK(0)."""
    done, cancelled = wire.seqnum(), wire.seqnum()
    for seq in (done, cancelled):
        wire.submit(seq, 1, Direction.IN, 512, now=1.0)
        wire.send(Role.CLIENT, CmdUnlink(wire.seqnum(), seq, wire.info.devid), now=1.5)
    wire.complete(done, now=1.6, data=bytes(10))
    # Some stubs answer a cancelled URB with a RET_SUBMIT carrying -ECONNRESET.
    wire.complete(cancelled, now=1.7, status=-ECONNRESET)
    labels = {**BULK, "direction": "in"}
    assert urbs(metrics, "ok", **labels) == 1
    assert urbs(metrics, "unlinked", **labels) == 1
    assert rtt_count(metrics, **labels) == 1
    assert in_flight(metrics) == 0


def test_iso_urb_packet_errors(metrics: GatewayMetrics, wire: Wire) -> None:
    packets = tuple(IsoPacket(i * 256, 256) for i in range(4))
    seq = wire.seqnum()
    wire.submit(seq, 3, Direction.IN, 1024, now=2.0, number_of_packets=4, iso_packets=packets)
    done = (
        IsoPacket(0, 256, 256, 0),
        IsoPacket(256, 256, 0, -EXDEV),
        IsoPacket(512, 256, 256, 0),
        IsoPacket(768, 256, 0, -EXDEV),
    )
    wire.complete(seq, now=2.004, data=bytes(512), number_of_packets=4, iso_packets=done)
    labels = {"role": "server", "transfer_type": "isochronous", "direction": "in"}
    assert rtt_count(metrics, **labels) == 1
    assert urbs(metrics, "ok", **labels) == 1
    assert sample(metrics, "usbip_gateway_iso_packets_total", **labels) == 4
    assert sample(metrics, "usbip_gateway_iso_packet_errors_total", **labels) == 2
    # error_count, when the stub sets it, is taken as is.
    seq = wire.seqnum()
    wire.submit(seq, 3, Direction.IN, 1024, now=3.0, number_of_packets=4, iso_packets=packets)
    wire.complete(
        seq, now=3.004, data=bytes(512), number_of_packets=4, error_count=3, iso_packets=done
    )
    assert sample(metrics, "usbip_gateway_iso_packet_errors_total", **labels) == 5


def test_urbs_for_endpoints_not_yet_learned_are_refused_not_counted(
    metrics: GatewayMetrics,
) -> None:
    """Before the descriptors, only endpoint 0 passes: nothing reaches the counters."""
    wire = Wire(metrics)
    wire.import_device(learn_endpoints=False)
    with pytest.raises(LocalProtocolError, match="not known for certain"):
        wire.submit(wire.seqnum(), 1, Direction.IN, 64, now=1.0)
    for transfer_type in ("unknown", "bulk"):
        assert not urbs(metrics, "ok", role="server", transfer_type=transfer_type, direction="in")


def test_in_flight_returns_to_zero_when_the_session_ends(
    metrics: GatewayMetrics, wire: Wire
) -> None:
    for _ in range(3):
        wire.submit(wire.seqnum(), 1, Direction.IN, 512, now=1.0)
    seq = wire.seqnum()
    wire.submit(seq, 2, Direction.OUT, 100, now=1.0)
    wire.complete(seq, now=1.001, actual_length=100)
    assert in_flight(metrics) == 3
    assert sample(metrics, "usbip_gateway_sessions_active", role="server") == 1
    relayed = sample(metrics, "usbip_gateway_relayed_bytes_total", role="server", sender="client")
    wire.session.outcome = Outcome(OutcomeKind.CONNECTION_LOST, "connection lost: reset")
    metrics.session_ended(wire.session)
    assert in_flight(metrics) == 0
    assert sample(metrics, "usbip_gateway_sessions_active", role="server") == 0
    assert sample(metrics, "usbip_gateway_urbs_abandoned_total", role="server") == 3
    # Byte counters keep what the ended session moved.
    assert (
        sample(metrics, "usbip_gateway_relayed_bytes_total", role="server", sender="client")
        == relayed
    )
    assert (
        sample(metrics, "usbip_gateway_sessions_total", role="server", outcome="connection_lost")
        == 1
    )
    assert (
        sample(
            metrics, "usbip_gateway_op_requests_total", role="server", type="import", status="ok"
        )
        == 1
    )
    metrics.session_ended(wire.session)  # twice is harmless
    assert sample(metrics, "usbip_gateway_urbs_abandoned_total", role="server") == 3


@pytest.mark.parametrize(("mode", "expected"), [("busid", "1-1.4"), ("vidpid", "1d6b:0104")])
def test_device_label(mode: str, expected: str) -> None:
    metrics = new_metrics(device_label=mode)
    wire = Wire(metrics)
    wire.import_device()
    labels = {"role": "server", "transfer_type": "control", "direction": "in", "device": expected}
    assert urbs(metrics, "ok", **labels) == 1
    assert wire.session.meter is not None
    assert wire.session.meter.device == expected


def test_device_label_is_capped() -> None:
    metrics = new_metrics(device_label="busid", device_label_limit=2)
    seen = []
    for busid in ("1-1", "1-2", "1-3", "1-4", "1-1"):
        wire = Wire(metrics, info=device(busid))
        wire.import_device()
        assert wire.session.meter is not None
        seen.append(wire.session.meter.device)
    assert seen == ["1-1", "1-2", "other", "other", "1-1"]
    devices = {
        s.labels["device"]
        for family in metrics.registry.collect()
        if family.name == "usbip_gateway_urbs"
        for s in family.samples
    }
    assert devices == {"1-1", "1-2", "other"}


def test_no_device_label_by_default(metrics: GatewayMetrics, wire: Wire) -> None:
    for family in metrics.registry.collect():
        for s in family.samples:
            assert "device" not in s.labels, s


def test_metrics_off_skips_urb_accounting() -> None:
    metrics = new_metrics(enabled=False)
    wire = Wire(metrics)
    wire.import_device()
    assert wire.session.meter is None
    assert wire.session.urbs_completed == 1  # the session's own counts stay
    assert urbs(metrics, "ok", role="server", transfer_type="control", direction="in") is None
    assert sample(metrics, "usbip_gateway_sessions_active", role="server") == 1


def test_quantile_of_an_empty_or_overflowing_sketch() -> None:
    counts = [0] * (len(FINE_BOUNDS) + 1)
    assert quantile(counts, 0.5) is None
    counts[-1] = 3
    assert quantile(counts, 0.99) == FINE_BOUNDS[-1]


def test_session_end_counts_protocol_errors_and_refused_ops(metrics: GatewayMetrics) -> None:
    wire = Wire(metrics)
    wire.send(Role.CLIENT, OpRequestDevlist(), 0.0)
    wire.session.outcome = protocol_error(Role.SERVER, "short reply", sender="usbipd")
    metrics.session_ended(wire.session)
    assert sample(metrics, "usbip_gateway_protocol_errors_total", role="server", side="server") == 1
    assert (
        sample(
            metrics, "usbip_gateway_op_requests_total", role="server", type="devlist", status="none"
        )
        == 1
    )
    denied = Wire(metrics)
    denied.send(Role.CLIENT, OpRequestImport("1-1"), 0.0)
    denied.session.outcome = Outcome(OutcomeKind.DENIED, "import denied by policy (rule 1)")
    metrics.session_ended(denied.session)
    assert (
        sample(
            metrics,
            "usbip_gateway_op_requests_total",
            role="server",
            type="import",
            status="denied",
        )
        == 1
    )


def test_handshake_and_policy_counters(metrics: GatewayMetrics) -> None:
    assert (
        sample(
            metrics,
            "usbip_gateway_tls_handshake_failures_total",
            role="server",
            reason="unknown_ca",
        )
        == 0
    )
    metrics.handshake_failed("unknown_ca")
    metrics.handshake_succeeded()
    assert sample(metrics, "usbip_gateway_tls_handshakes_total", role="server") == 2
    assert (
        sample(
            metrics,
            "usbip_gateway_tls_handshake_failures_total",
            role="server",
            reason="unknown_ca",
        )
        == 1
    )
    metrics.record_policy_decision("import", allowed=False, device="1-1")
    metrics.record_policy_decision("devlist", allowed=True)
    assert (
        sample(
            metrics,
            "usbip_gateway_policy_decisions_total",
            role="server",
            target="import",
            decision="deny",
        )
        == 1
    )
    with pytest.raises(ValueError, match="policy target"):
        metrics.record_policy_decision("everything", allowed=True)  # type: ignore[arg-type]
    metrics.connection_refused()
    assert (
        sample(
            metrics, "usbip_gateway_connections_refused_total", role="server", limit="connections"
        )
        == 1
    )
    metrics.compressed("compress", 1000, 300)
    assert (
        sample(
            metrics,
            "usbip_gateway_compression_output_bytes_total",
            role="server",
            operation="compress",
        )
        == 300
    )
