"""Soak: many sessions streaming through the gateway pair at once, every byte checked.

`USBIP_GW_SOAK_SECONDS` (default 60) sets the run's length, `USBIP_GW_SOAK_SESSIONS`
(default 100) how many sessions run at once: each imports its own simulated loopback
device, then writes random-sized random payloads to bulk OUT and reads them back from
bulk IN until the time is up. Asserts zero corrupted or lost bytes and no failed URB,
open file descriptors flat (the same after warm-up and at the end, and back to the
baseline once every session closed) and RSS flat (growth after warm-up under
RSS_GROWTH_LIMIT). Prints its figures (`pytest -s` shows them).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from gateway.config import Address
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import Direction
from gateway.sim.gadget_zero import Loopback
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.usbip.importer import ImportedDevice, import_device

from ..hostile.usbipd import Tracker
from ..pkitools import PKI, client_config, server_config

SOAK_SECONDS = float(os.environ.get("USBIP_GW_SOAK_SECONDS", "60"))
SESSIONS = int(os.environ.get("USBIP_GW_SOAK_SESSIONS", "100"))
WARM_UP = min(10.0, SOAK_SECONDS / 4)  # seconds before the flat-resources baseline
RSS_GROWTH_LIMIT = 48 * 1024 * 1024  # bytes of RSS growth allowed after warm-up
SIZES = (1, 64, 511, 512, 513, 4096, 16 * 1024, 64 * 1024, 200 * 1024)
BULK = 1  # the loopback device's endpoints 0x01 / 0x81
SAMPLE_EVERY = 5.0  # seconds between descriptor and RSS samples


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass
class Totals:
    bytes_out: int = 0
    bytes_in: int = 0
    urbs: int = 0
    round_trips: list[float] = field(default_factory=list)
    sessions_done: int = 0


async def stream_through(
    device: ImportedDevice, deadline: float, source: bytes, totals: Totals, rng: random.Random
) -> None:
    """OUT then IN until `deadline`, checking each payload comes back byte for byte."""
    while trio.current_time() < deadline:
        size = rng.choice(SIZES)
        start = rng.randrange(len(source) - size)
        payload = source[start : start + size]
        began = time.perf_counter()
        out = await device.submit(BULK, Direction.OUT, data=payload)
        totals.round_trips.append(time.perf_counter() - began)
        assert out.status == 0, f"OUT failed with {out.status}"
        assert out.ret is not None
        assert out.ret.actual_length == size
        back = bytearray()
        while len(back) < size:
            began = time.perf_counter()
            done = await device.submit(BULK, Direction.IN, length=size - len(back))
            totals.round_trips.append(time.perf_counter() - began)
            assert done.status == 0, f"IN failed with {done.status}"
            back += done.data
            totals.urbs += 1
        assert back == payload, "corrupted payload"
        totals.urbs += 1
        totals.bytes_out += size
        totals.bytes_in += len(back)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def test_soak_many_sessions_stream_without_loss_or_leaks(
    pki: PKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway")
    sim = SimServer(
        Loopback(busid=f"2-{i + 1}", busnum=2, devnum=i + 2, serial=f"SOAK-{i:04}")
        for i in range(SESSIONS)
    )
    sim_sessions = Tracker()
    sim.handle_stream = sim_sessions.wrap(sim.handle_stream)  # type: ignore[method-assign,assignment]
    await nursery.start(partial(serve_sim, sim, host="127.0.0.1", port=0))
    server = ServerGateway(server_config(pki, Address(*sim.addresses[0])), strings=sim)
    listeners = await nursery.start(server.serve)
    client = ClientGateway(client_config(pki, local_address(listeners[0])))
    client_sessions = Tracker()
    client.handle = client_sessions.wrap(client.handle)  # type: ignore[method-assign,assignment]
    listeners = await nursery.start(client.serve)
    host, port = listeners[0].socket.getsockname()[:2]

    gc.collect()
    fds_before = open_fds()
    source = random.Random(0).randbytes(max(SIZES) * 4)
    totals = Totals()
    started = trio.current_time()
    deadline = started + SOAK_SECONDS
    samples: list[tuple[float, int, int]] = []  # (seconds in, fds, RSS) from warm-up on

    async def session(i: int) -> None:
        device = await import_device(await trio.open_tcp_stream(host, port), f"2-{i + 1}")
        async with trio.open_nursery() as inner:
            inner.start_soon(device.serve)
            await stream_through(device, deadline, source, totals, random.Random(i))
            await device.aclose()
        totals.sessions_done += 1

    async def monitor() -> None:
        # Measurement points, not synchronisation: from warm-up to just before the end.
        points = [started + WARM_UP + k * SAMPLE_EVERY for k in range(int(SOAK_SECONDS))]
        for point in [p for p in points if p < deadline - 1] + [deadline - 0.5]:
            await trio.sleep_until(point)
            gc.collect()
            samples.append((trio.current_time() - started, open_fds(), rss_bytes()))

    with trio.fail_after(SOAK_SECONDS + 120):
        async with trio.open_nursery() as sessions:
            sessions.start_soon(monitor)
            for i in range(SESSIONS):
                sessions.start_soon(session, i)
        await client_sessions.idle()
        await server.wait_idle()
        await sim_sessions.idle()
    elapsed = trio.current_time() - started
    gc.collect()
    fds_after = open_fds()
    (_, fds_warm, rss_warm), (_, fds_end, rss_end) = samples[0], samples[-1]
    series = ", ".join(f"{t:.0f}s {r / 2**20:.0f}" for t, _, r in samples)
    rtt = totals.round_trips
    print(
        f"\nsoak: {SESSIONS} concurrent sessions for {elapsed:.1f}s: "
        f"{totals.bytes_out / 2**20:.1f} MiB out and {totals.bytes_in / 2**20:.1f} MiB back "
        f"verified, {totals.urbs} URBs, "
        f"{(totals.bytes_out + totals.bytes_in) / 2**20 / elapsed:.1f} MiB/s through the pair, "
        f"RTT p50 {percentile(rtt, 0.5) * 1000:.1f} ms p99 {percentile(rtt, 0.99) * 1000:.1f} ms; "
        f"fds {fds_before} before, {fds_warm} after warm-up, {fds_end} at the end, "
        f"{fds_after} after; RSS {rss_warm / 2**20:.1f} MiB after warm-up, "
        f"{rss_end / 2**20:.1f} MiB at the end (MiB: {series})"
    )
    assert totals.sessions_done == SESSIONS
    assert totals.bytes_in == totals.bytes_out > 0
    assert sim.imports == SESSIONS
    assert {fds for _, fds, _ in samples} == {fds_warm}, "descriptors changed while running"
    # 3 hops, 2 ends each; each gateway's relay has an eventfd to wake its threads
    assert fds_end == fds_warm == fds_before + 8 * SESSIONS
    assert fds_after == fds_before, "descriptors leaked"
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT, "RSS grew after warm-up"
    ends = [r.getMessage() for r in caplog.records if "session end" in r.msg]
    assert len(ends) == 2 * SESSIONS  # one line per session from each gateway
    assert all("closed by client" in end for end in ends), [
        e for e in ends if "closed by client" not in e
    ][:3]
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [
        "no policy file: every client with a valid certificate may list and import every device"
    ]
