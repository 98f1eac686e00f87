"""What URB metrics cost: bulk URBs through the gateway pair on loopback, metrics on/off.

    python -m tests.observability.bench_metrics [--runs 9] [--urbs 1000]

Simulator, server gateway, client gateway and the load generator share one process and
one Trio loop, so the figures are CPU-bound and measure the gateways' own work. Batches
of `--urbs` 64 KiB bulk URBs (OUT and IN alternately, 8 in flight) go through one stack,
alternating between metrics on and off so that machine load drifts hit both alike;
medians are reported. Also times the per-URB accounting call alone.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import trio

from gateway.accounting.series import DeviceLabeler, SeriesTable, SessionMeter
from gateway.demo import start_stack
from gateway.protocol import Direction, PendingUrb, RetSubmit, Setup, TransferType
from gateway.usbip.importer import import_device

from ..pkitools import make_pki

SIZE = 64 * 1024
DEPTH = 8
GET_CONFIGURATION = Setup(0x80, 0x06, 0x0200, 0, 4096)


async def run_batches(pki_dir: Path, urbs: int, batches: int) -> dict[bool, list[float]]:
    """Seconds per batch of `urbs` bulk URBs, batches alternating metrics on and off.

    One stack and one imported device throughout; "off" detaches the sessions' URB
    meters on both gateways (what `metrics.enabled = false` does at session start).
    """
    pki = make_pki(pki_dir)
    times: dict[bool, list[float]] = {True: [], False: []}
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, pki.server_tls(), pki.client_tls())
        stream = await trio.open_tcp_stream("127.0.0.1", stack.client_address.port)
        device = await import_device(stream, "1-1")  # Gadget Zero source/sink
        nursery.start_soon(device.serve)
        await device.control(GET_CONFIGURATION)  # endpoint types learned, as in real use
        sessions = [s for g in (stack.server, stack.client) for s in g.metrics.sessions.values()]
        meters = [s.meter for s in sessions]
        payload = bytes(SIZE)

        async def worker(n: int) -> None:
            for i in range(n):
                if i % 2:
                    done = await device.submit(1, Direction.IN, length=SIZE)
                else:
                    done = await device.submit(1, Direction.OUT, data=payload)
                assert done.status == 0

        for batch in range(batches * 2 + 1):
            on = batch % 2 == 1  # batch 0 warms up and is not counted
            for session, meter in zip(sessions, meters, strict=True):
                session.meter = meter if on else None
            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(DEPTH):
                    workers.start_soon(worker, urbs // DEPTH)
            if batch:
                times[on].append(time.perf_counter() - started)
        await device.aclose()
        nursery.cancel_scope.cancel()
    return times


def accounting_cost() -> float:
    """Nanoseconds per `SessionMeter.completed` call (one completed bulk IN URB)."""
    meter = SessionMeter(SeriesTable(), DeviceLabeler())
    urb = PendingUrb(1, 1, Direction.IN, TransferType.BULK, False, SIZE, 0, submitted_at=1.0)
    ret = RetSubmit(1, actual_length=SIZE, data=b"")
    n = 200_000
    return timeit.timeit(lambda: meter.completed(urb, ret, 1.0003), number=n) / n * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--urbs", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.getLogger("gateway").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        results = trio.run(run_batches, Path(tmp), args.urbs, args.runs)
    mib = args.urbs * SIZE / 2**20
    print(
        f"batches of {args.urbs} bulk URBs of 64 KiB, {DEPTH} in flight, "
        f"{args.runs} batches each, alternating (median):"
    )
    for on in (True, False):
        seconds = statistics.median(results[on])
        spread = f"{min(results[on]):.3f}-{max(results[on]):.3f} s"
        print(
            f"  metrics {'on ' if on else 'off'}: {args.urbs / seconds:8.0f} URB/s "
            f"{mib / seconds:7.1f} MiB/s  ({seconds:.3f} s; range {spread})"
        )
    # Each "on" batch against the "off" batch right before it: drift cancels out.
    paired = [a / b for a, b in zip(results[True], results[False], strict=True)]
    print(
        f"  on/off time, median of adjacent pairs: {(statistics.median(paired) - 1) * 100:+.1f} %"
    )
    print(f"  accounting per completed URB: {accounting_cost():.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
