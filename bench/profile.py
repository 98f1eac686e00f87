"""Profile the gateway pair under one load, with py-spy on both gateway processes.

    python -m bench.profile --size 64 --depth 1 --seconds 10      # the round-trip case
    python -m bench.profile --size 65536 --depth 8 --seconds 10   # the throughput case

Starts the simulator and the mTLS pair as `bench.throughput` does, streams URBs for
`--seconds` while `py-spy record` samples each gateway (all threads, only while they
hold the GIL: Python's own time), and writes one flame graph per gateway (SVG) and
their top functions by own time (`--out`, default results/profile/).
`pip install py-spy`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from bench.loadgen import Device
from bench.procs import Launcher, busid


async def profile(size: int, depth: int, seconds: float, out: Path, zstd: bool) -> None:
    from gateway.pki.ca import make_demo_pki  # noqa: PLC0415

    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        make_demo_pki(Path(tmp) / "pki", force=True)
        launcher = Launcher(out / "logs", Path(tmp) / "pki")
        sim = await launcher.sim(2)
        path = await launcher.gateways(sim, zstd=zstd)
        try:
            device = await Device.open(path.port, busid(0))
            await device.stream_urbs(size=size, depth=depth, seconds=0.5)  # warm-up
            names = ("client", "server")
            spies = [
                subprocess.Popen(
                    [
                        spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                        "--rate", "500", "--gil", "--format", fmt,
                        "--output", str(out / f"{name}.{ext}"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for pid, name in zip(path.pids, names, strict=True)
                for fmt, ext in (("flamegraph", "svg"), ("raw", "txt"))
            ]  # fmt: skip
            result = await device.stream_urbs(
                size=size, depth=depth, seconds=seconds + 1, record_rtt=depth == 1
            )
            for spy_proc in spies:
                await trio.to_thread.run_sync(spy_proc.wait)
            await device.aclose()
        finally:
            path.stop()
            sim.stop()
    mib = result.payload / 2**20
    print(f"{size} B x depth {depth}: {mib / result.seconds:.1f} MiB/s, {result.errors} errors")
    for name in names:
        print(f"\n== {name} gateway: own time by function (of all samples)")
        print(top_functions(out / f"{name}.txt"))


def top_functions(raw: Path, count: int = 25) -> str:
    """py-spy's collapsed stacks -> the functions that were on top most often."""
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + n
    rows = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"{n / total:6.1%}  {leaf}" for leaf, n in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--zstd", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/profile"))
    opts = parser.parse_args(argv)
    trio.run(profile, opts.size, opts.depth, opts.seconds, opts.out, opts.zstd)


if __name__ == "__main__":
    sys.exit(main())
