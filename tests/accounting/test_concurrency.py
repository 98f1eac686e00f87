"""Relay threads write URB series while /metrics, in the Trio thread, reads them."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from gateway.accounting.session import Session
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import Direction, PendingUrb, RetSubmit, TransferType

from ..observability.helpers import new_metrics

DEVICES = 2000
URBS = 3  # per device


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads give up the interpreter as often as it allows: races show up in a few loops."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _scrape(metrics: GatewayMetrics) -> dict[str, float]:
    """Completed URBs as the histogram counts them, and as the result counters do."""
    totals = {"histogram": 0.0, "results": 0.0}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "usbip_gateway_urb_rtt_seconds_count":
                totals["histogram"] += s.value
            elif s.name == "usbip_gateway_urbs_total" and s.labels["result"] != "unlinked":
                totals["results"] += s.value
    return totals


@pytest.mark.usefixtures("fast_switching")
def test_scrapes_while_a_thread_adds_devices_and_completes_urbs() -> None:
    metrics = new_metrics(device_label="busid", device_label_limit=DEVICES)
    urb = PendingUrb(1, 1, Direction.IN, TransferType.BULK, False, 512, 0, submitted_at=1.0)
    ret = RetSubmit(1, actual_length=512)
    failures: list[BaseException] = []

    def relay() -> None:
        try:
            for i in range(DEVICES):
                session = Session("server", "peer", "127.0.0.1:1", 0.0)
                metrics.session_started(session)
                assert session.meter is not None
                session.meter.imported(f"1-{i + 1}", None)  # a new set of series
                for _ in range(URBS):
                    session.meter.completed(urb, ret, 1.001)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=relay)
    thread.start()
    scrapes = 0
    while thread.is_alive():  # bounded: the relay's work is finite
        # What a scrape reads first: every series, each with its histogram and results.
        for _, _, _, series in metrics.table.items():
            assert series.completed == series.ok + series.error
        scrapes += 1
    thread.join()
    assert failures == []
    assert scrapes
    expected = DEVICES * URBS
    assert _scrape(metrics) == {"histogram": expected, "results": expected}
