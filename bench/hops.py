"""What each relay costs per hop: round trip and CPU per URB at 64 B, depth 1.

    python -m bench.hops [--urbs 2000] [--runs 5]

Side by side, alternating run by run, one simulator: direct; a floor relay pair in
Python (`bench.floor_relay`: blocking recv/sendall, nothing else); the gateway's relay
without TLS (`bench.procs plain`); the gateway mTLS pair; a stunnel pair; a socat pair.
For each: the median round trip, what it adds to direct's, and the CPU both relay
processes spent per URB (utime + stime from /proc over the run; socat's children are
only counted once reaped, so it shows none). In a ping-pong one process runs at a
time, so a relay's CPU per URB is its share of the round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import trio

from bench.loadgen import BenchError, Device
from bench.procs import LOOPBACK, Launcher, Path_, busid, free_port, wait_listening

SIZE = 64


async def floor_pair(launcher: Launcher, sim: Path_) -> Path_:
    server, client = free_port(), free_port()
    procs = []
    for name, listen, upstream in (
        ("floor-server", server, sim.port),
        ("floor-client", client, server),
    ):
        argv = [sys.executable, "-m", "bench.floor_relay", "--listen", f"{LOOPBACK}:{listen}"]
        argv += ["--upstream", f"{LOOPBACK}:{upstream}"]
        procs.append(launcher.spawn(name, argv))
        await wait_listening(listen)
    return Path_("python floor (recv/sendall)", client, procs)


async def hops(urbs: int, runs: int, out: Path) -> None:
    from gateway.pki.ca import make_demo_pki  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        make_demo_pki(Path(tmp) / "pki", force=True)
        launcher = Launcher(out / "logs", Path(tmp) / "pki")
        sim = await launcher.sim(8)
        paths: list[Path_] = []
        try:
            paths = [
                await launcher.direct(sim),
                await floor_pair(launcher, sim),
                await launcher.plain(sim),
                await launcher.gateways(sim, zstd=False),
                await launcher.stunnel(sim),
                await launcher.socat(sim),
            ]
            devices = [await Device.open(p.port, busid(i)) for i, p in enumerate(paths)]
            rtt: dict[str, list[float]] = {p.name: [] for p in paths}
            cpu: dict[str, list[float]] = {p.name: [] for p in paths}
            for device in devices:  # warm-up
                await device.stream_urbs(size=SIZE, depth=1, count=200)
            for _ in range(runs):
                for path, device in zip(paths, devices, strict=True):
                    before = path.cpu()
                    result = await device.stream_urbs(
                        size=SIZE, depth=1, count=urbs, record_rtt=True
                    )
                    if result.errors:
                        raise BenchError(f"{result.errors} URBs failed through {path.name}")
                    cpu[path.name].append((path.cpu() - before) / urbs * 1e6)
                    rtt[path.name].append(statistics.median(result.rtts_ns) / 1000)
            for device in devices:
                await device.aclose()
        finally:
            for path in [*paths, sim]:
                path.stop()
    base = statistics.median(rtt[paths[0].name])
    print(f"{urbs} URBs of {SIZE} B at depth 1, medians of {runs} runs\n")
    print("| path | RTT p50 µs | added µs | relay CPU µs/URB (both processes) |")
    print("|---|---:|---:|---:|")
    for path in paths:
        median = statistics.median(rtt[path.name])
        spent = f"{statistics.median(cpu[path.name]):.0f}" if path.procs else "-"
        added = f"{median - base:.0f}" if path is not paths[0] else "-"
        print(f"| {path.name} | {median:.0f} | {added} | {spent} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urbs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/hops"))
    opts = parser.parse_args(argv)
    trio.run(hops, opts.urbs, opts.runs, opts.out)


if __name__ == "__main__":
    main()
