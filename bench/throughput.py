"""Throughput, round trip, CPU and memory of every path to a USB/IP device, side by side.

    python -m bench.throughput [--full] [--runs 3] [--seconds 1] [--out results/bench]

Paths, each its own processes, all to one simulator process (`bench.procs sim`):
direct (no relay), the gateway pair over plain TCP (parsing only, bench-only harness),
the gateway pair with mutual TLS, the same with `--compression zstd`, a stunnel pair
(mutual TLS, TCP_NODELAY both sides), a socat pair (the floor: bytes moved, nothing
parsed). The load generator (bench.loadgen) runs in this process.

Measured, runs interleaved path by path so machine load drifts hit every path alike:
- throughput (MiB/s of URB data, both directions) over URB size x queue depth;
- round trip of 64-byte URBs at depth 1 (p50, p99);
- CPU seconds per GiB of the relaying processes (utime + stime from /proc);
- peak RSS (VmHWM) of each relaying process;
- N concurrent sessions (one device each): paced 64-byte round trips (p99), then every
  session streaming 64 KiB URBs at once (aggregate MiB/s), errors, RSS after.
Every figure is the median over `--runs`. Results go to `--out`: results.json, results.md
and throughput.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.loadgen import DIRECTIONS, BenchError, Device, Result
from bench.procs import ROOT, Launcher, Path_, busid

PATHS = ("direct", "plain", "tls", "zstd", "stunnel", "socat")
BEFORE = "tls-before"  # with --before DIR: the mTLS pair run from another tree
SIZES = (512, 4096, 65536, 1048576)
DEPTHS = (1, 8)
FULL_SIZES = (512, 2048, 8192, 32768, 65536, 262144, 1048576)
FULL_DEPTHS = (1, 2, 4, 8, 16, 32)
KEY_POINT = (65536, 8)
LATENCY_SIZE = 64


@dataclass
class Options:
    paths: Sequence[str] = PATHS
    sizes: Sequence[int] = SIZES
    depths: Sequence[int] = DEPTHS
    runs: int = 3
    seconds: float = 1.0
    direction: str = "mixed"
    latency_urbs: int = 2000
    unlinks: int = 50
    sessions: int = 100
    session_seconds: float = 2.0
    session_rate: float = 5.0  # paced URBs per second per session
    out: Path = Path("results/bench")
    before: Path | None = None  # a tree holding an earlier `gateway` package


@dataclass
class PathFigures:
    name: str
    throughput: dict[str, list[float]] = field(default_factory=dict)  # "size/depth" -> MiB/s
    cpu_per_gib: dict[str, list[float]] = field(default_factory=dict)
    rtt_p50_us: list[float] = field(default_factory=list)
    rtt_p99_us: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)  # per process, single session
    urbs: int = 0
    verified: int = 0
    errors: int = 0
    unlinks_ok: int = 0
    sessions: int = 0
    sessions_mib_s: float = 0.0
    sessions_rtt_p50_us: float = 0.0
    sessions_rtt_p99_us: float = 0.0
    sessions_errors: int = 0
    sessions_rss_mib: list[float] = field(default_factory=list)
    sessions_idle_rss_mib: list[float] = field(default_factory=list)
    session_failures: list[str] = field(default_factory=list)  # failed connects/imports

    def count(self, result: Result) -> None:
        self.urbs += result.urbs
        self.verified += result.verified
        self.errors += result.errors


def key(size: int, depth: int) -> str:
    return f"{size}/{depth}"


def percentile(values: Sequence[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def start_paths(
    launcher: Launcher, sim: Path_, names: Sequence[str], before: Path | None
) -> list[Path_]:
    if before is not None:
        names = [*names, BEFORE]
    starters: dict[str, Callable[[], Awaitable[Path_]]] = {
        "direct": lambda: launcher.direct(sim),
        "plain": lambda: launcher.plain(sim),
        "tls": lambda: launcher.gateways(sim, zstd=False),
        "zstd": lambda: launcher.gateways(sim, zstd=True),
        "stunnel": lambda: launcher.stunnel(sim),
        "socat": lambda: launcher.socat(sim),
        BEFORE: lambda: launcher.gateways(sim, zstd=False, root=before or ROOT, tag=" (before)"),
    }
    return [await starters[name]() for name in names]


async def single_session(
    opts: Options, paths: list[Path_], figures: dict[str, PathFigures], say: Callable[[str], None]
) -> None:
    devices = [await Device.open(p.port, busid(i)) for i, p in enumerate(paths)]
    try:
        for device in devices:  # warm-up, not counted
            await device.stream_urbs(size=65536, depth=4, seconds=0.2)
        for path, device in zip(paths, devices, strict=True):
            result = await device.unlinks(opts.unlinks)
            figures[path.name].count(result)
            figures[path.name].unlinks_ok = result.verified
        for run in range(opts.runs):
            for size in opts.sizes:
                for depth in opts.depths:
                    for path, device in zip(paths, devices, strict=True):
                        cpu = path.cpu()
                        result = await device.stream_urbs(
                            size=size, depth=depth, direction=opts.direction, seconds=opts.seconds
                        )
                        cpu = path.cpu() - cpu
                        fig = figures[path.name]
                        fig.count(result)
                        mib = result.payload / 2**20
                        fig.throughput.setdefault(key(size, depth), []).append(mib / result.seconds)
                        if path.procs:
                            fig.cpu_per_gib.setdefault(key(size, depth), []).append(
                                cpu / (mib / 1024) if mib else float("nan")
                            )
                say(f"run {run + 1}/{opts.runs}: {len(opts.sizes) * len(opts.depths)} grid points")
            for path, device in zip(paths, devices, strict=True):
                result = await device.stream_urbs(
                    size=LATENCY_SIZE, depth=1, count=opts.latency_urbs, record_rtt=True
                )
                fig = figures[path.name]
                fig.count(result)
                fig.rtt_p50_us.append(percentile(result.rtts_ns, 0.50))
                fig.rtt_p99_us.append(percentile(result.rtts_ns, 0.99))
    finally:
        for device in devices:
            await device.aclose()
    for path in paths:
        figures[path.name].peak_rss_mib = path.peak_rss()


async def many_sessions(opts: Options, path: Path_, fig: PathFigures) -> None:
    devices: list[Device] = []

    limit = trio.CapacityLimiter(10)  # connections being set up at once

    async def open_one(i: int) -> None:
        async with limit:
            for attempt in range(3):
                try:
                    devices.append(await Device.open(path.port, busid(i), busy_timeout=30))
                except (OSError, trio.BrokenResourceError, BenchError) as exc:
                    fig.session_failures.append(f"session {i}, attempt {attempt + 1}: {exc}")
                    await trio.sleep(0.2)
                else:
                    return

    async with trio.open_nursery() as nursery:
        for i in range(opts.sessions):
            nursery.start_soon(open_one, i)
    fig.sessions = len(devices)
    fig.sessions_idle_rss_mib = path.rss()  # all imported, nothing streamed yet
    paced: list[Result] = []
    bulk: list[Result] = []
    interval = 1 / opts.session_rate

    async def paced_one(device: Device) -> None:
        await trio.sleep(random.uniform(0, interval))
        paced.append(
            await device.stream_urbs(
                size=LATENCY_SIZE,
                depth=1,
                seconds=opts.session_seconds,
                record_rtt=True,
                interval=interval,
            )
        )

    async def bulk_one(device: Device) -> None:
        bulk.append(await device.stream_urbs(size=65536, depth=1, seconds=opts.session_seconds))

    try:
        for phase in (paced_one, bulk_one):
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(phase, device)
            if phase is bulk_one:
                elapsed = time.perf_counter() - started
                fig.sessions_mib_s = sum(r.payload for r in bulk) / 2**20 / elapsed
        total = Result()
        for r in paced + bulk:
            total.add(r)
        fig.count(total)
        fig.sessions_errors = total.errors
        fig.sessions_rtt_p50_us = percentile(total.rtts_ns, 0.50)
        fig.sessions_rtt_p99_us = percentile(total.rtts_ns, 0.99)
        fig.sessions_rss_mib = path.rss()
    finally:
        for device in devices:
            await device.aclose()


async def bench(opts: Options, say: Callable[[str], None]) -> dict[str, PathFigures]:
    from gateway.pki.ca import make_demo_pki  # noqa: PLC0415

    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        make_demo_pki(Path(tmp) / "pki", force=True)
        launcher = Launcher(opts.out / "logs", Path(tmp) / "pki")
        sim = await launcher.sim(max(opts.sessions, len(opts.paths) + 1))
        paths: list[Path_] = []
        try:
            paths = await start_paths(launcher, sim, opts.paths, opts.before)
            figures = {p.name: PathFigures(p.name) for p in paths}
            say(f"started {', '.join(p.name for p in paths)}")
            await single_session(opts, paths, figures, say)
            if opts.sessions:
                for path in paths:
                    fig = figures[path.name]
                    try:
                        await many_sessions(opts, path, fig)
                    except* (OSError, trio.BrokenResourceError, BenchError) as group:
                        fig.session_failures.append(repr(group.exceptions[0]))
                        fig.sessions_errors += 1
                    say(
                        f"{fig.sessions} sessions through {path.name}, "
                        f"{len(fig.session_failures)} failed connects"
                    )
            dead = [p.name for p in [sim, *paths] if not p.alive()]
            if dead:
                raise RuntimeError(f"processes of {dead} died; see {opts.out / 'logs'}")
        finally:
            for p in [*paths, sim]:
                p.stop()
    return figures


# ------------------------------------------------------------------ reporting


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _size(n: int) -> str:
    return f"{n // 1048576} MiB" if n >= 1048576 else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def summary(figures: dict[str, PathFigures], opts: Options) -> dict[str, dict[str, Any]]:
    k = key(*KEY_POINT)
    out: dict[str, dict[str, Any]] = {}
    for name, f in figures.items():
        out[name] = {
            "mib_s": median(f.throughput.get(k, [])),
            "rtt_p50_us": median(f.rtt_p50_us),
            "rtt_p99_us": median(f.rtt_p99_us),
            "cpu_s_per_gib": median(f.cpu_per_gib.get(k, [])),
            "peak_rss_mib": f.peak_rss_mib,
            "errors": f.errors,
            "verified": f.verified,
            "urbs": f.urbs,
        }
    return out


def markdown(figures: dict[str, PathFigures], opts: Options, note: str) -> str:
    s = summary(figures, opts)
    direct = s.get("direct", {})
    stunnel = s.get("stunnel", {})
    size, depth = KEY_POINT
    lines = [
        f"{note}",
        "",
        f"Medians of {opts.runs} runs of {opts.seconds:g} s; direction {opts.direction}; "
        f"round trip: {opts.latency_urbs} URBs of {LATENCY_SIZE} B at depth 1 per run.",
        "",
        f"| path | MiB/s {_size(size)} d{depth} | vs direct | vs stunnel | RTT p50 µs | "
        "RTT p99 µs | added p50/p99 µs | CPU s/GiB | peak RSS MiB | URBs verified | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        added = (
            f"{row['rtt_p50_us'] - direct['rtt_p50_us']:.0f} / "
            f"{row['rtt_p99_us'] - direct['rtt_p99_us']:.0f}"
            if direct and name != "direct"
            else "-"
        )
        rss = " + ".join(f"{r:.0f}" for r in row["peak_rss_mib"]) or "-"
        cpu = row["cpu_s_per_gib"]
        lines.append(
            f"| {name} | {row['mib_s']:.0f} | {_ratio(row['mib_s'], direct.get('mib_s', 0))} "
            f"| {_ratio(row['mib_s'], stunnel.get('mib_s', 0))} | {row['rtt_p50_us']:.0f} "
            f"| {row['rtt_p99_us']:.0f} | {added} | {'-' if math.isnan(cpu) else f'{cpu:.1f}'} "
            f"| {rss} | {row['verified']} | {row['errors']} |"
        )
    grid = [key(sz, d) for d in opts.depths for sz in opts.sizes]
    lines += [
        "",
        "Throughput, MiB/s (URB size / queue depth):",
        "",
        "| path | "
        + " | ".join(f"{_size(sz)} d{d}" for d in opts.depths for sz in opts.sizes)
        + " |",
        "|---|" + "---:|" * len(grid),
    ]
    for name, f in figures.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{median(f.throughput.get(g, [])):.1f}" for g in grid)
            + " |"
        )
    if any(f.sessions for f in figures.values()):
        lines += [
            "",
            f"{opts.sessions} concurrent sessions, one device each: paced {LATENCY_SIZE} B "
            f"URBs ({opts.session_rate:g}/s per session) for the round trip, then all "
            f"streaming 64 KiB URBs at depth 1 for {opts.session_seconds:g} s:",
            "",
            "| path | sessions | MiB/s total | RTT p50 µs | RTT p99 µs | p99 vs 1 session "
            "| RSS MiB idle | RSS MiB after streaming | errors | failed connects |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in figures.items():
            rss = " + ".join(f"{r:.0f}" for r in f.sessions_rss_mib) or "-"
            idle = " + ".join(f"{r:.0f}" for r in f.sessions_idle_rss_mib) or "-"
            lines.append(
                f"| {name} | {f.sessions} | {f.sessions_mib_s:.0f} | {f.sessions_rtt_p50_us:.0f} "
                f"| {f.sessions_rtt_p99_us:.0f} "
                f"| {_ratio(f.sessions_rtt_p99_us, median(f.rtt_p99_us))} | {idle} | {rss} "
                f"| {f.sessions_errors} | {len(f.session_failures)} |"
            )
    return "\n".join(lines) + "\n"


def plot(figures: dict[str, PathFigures], opts: Options, target: Path) -> bool:
    try:
        import matplotlib as mpl  # noqa: PLC0415

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(opts.depths), figsize=(5 * len(opts.depths), 4), sharey=True)
    if len(opts.depths) == 1:
        axes = [axes]
    for ax, depth in zip(axes, opts.depths, strict=True):
        for name, f in figures.items():
            ys = [median(f.throughput.get(key(s, depth), [])) for s in opts.sizes]
            ax.plot(opts.sizes, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("URB size (bytes)")
        ax.set_title(f"queue depth {depth}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("MiB/s (median)")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def write_results(figures: dict[str, PathFigures], opts: Options, note: str) -> str:
    opts.out.mkdir(parents=True, exist_ok=True)
    text = markdown(figures, opts, note)
    (opts.out / "results.md").write_text(text)
    raw = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "note": note,
        "summary": summary(figures, opts),
        "paths": {n: asdict(f) for n, f in figures.items()},
    }
    (opts.out / "results.json").write_text(json.dumps(raw, indent=1))
    plot(figures, opts, opts.out / "throughput.png")
    return text


def load_note() -> str:
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load} before the run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="the whole size x depth grid")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--sizes", type=int, nargs="+", help="URB sizes in bytes")
    parser.add_argument("--depths", type=int, nargs="+", help="queue depths")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per grid point and run")
    parser.add_argument("--direction", choices=DIRECTIONS, default="mixed")
    parser.add_argument("--latency-urbs", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=100, help="concurrent sessions (0: skip)")
    parser.add_argument("--session-seconds", type=float, default=2.0)
    parser.add_argument(
        "--session-rate", type=float, default=5.0, help="paced 64 B URBs per second per session"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="also run the mTLS pair from DIR/gateway (e.g. `git archive REV gateway`), "
        "to compare a change side by side",
    )


def options(args: argparse.Namespace) -> Options:
    return Options(
        paths=args.paths,
        sizes=args.sizes or (FULL_SIZES if args.full else SIZES),
        depths=args.depths or (FULL_DEPTHS if args.full else DEPTHS),
        runs=args.runs,
        seconds=args.seconds,
        direction=args.direction,
        latency_urbs=args.latency_urbs,
        sessions=args.sessions,
        session_seconds=args.session_seconds,
        session_rate=getattr(args, "session_rate", 5.0),
        out=args.out,
        before=getattr(args, "before", None),
    )


def run(args: argparse.Namespace) -> int:
    opts = options(args)
    note = load_note()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # e.g. the gateways' "no policy file"
    try:
        figures = trio.run(bench, opts, say)
    finally:
        logging.disable(previous)
    print(write_results(figures, opts, note))
    errors = sum(f.errors for f in figures.values())
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
