"""Compression between the gateways: ratio, throughput and gateway CPU, off vs zstd.

    python -m bench.compression [--runs 5] [--mib 32] [--level 3]

A mass-storage-like workload through the whole path: 64 KiB bulk OUT URBs to the
simulator's loopback device (1-2), each read back with bulk IN and checked. The blocks are
a fixed mix, like a disk holding documents, media and free space: 1/2 text-like (words,
compresses about 3-4x), 3/8 random (already-compressed or encrypted data), 1/8 zeros.

The two gateways of each mode (compression none, compression zstd) run in a child
process of their own, so its CPU time (user + system, `time.process_time()` read in the
child) is the gateways' alone: TLS, frame parsing, metrics and compression. The simulator
and the load client run in this process. Runs alternate between the modes; the figures
are medians. Ratio is the compression layer's plain bytes in over wire bytes out (chunk
headers included), both gateways, both directions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

BLOCK = 64 * 1024
LOOPBACK_BUSID = "1-2"
TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more can said who up out them into some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "device endpoint transfer interface configuration descriptor request status"
)
WORDS = TEXT.split()


def text_block(rng: random.Random) -> bytes:
    out: list[str] = []
    size = 0
    while size < BLOCK:
        word = rng.choice(WORDS)
        sep = "\n" if rng.random() < 0.08 else " "
        out.append(word + sep)
        size += len(word) + 1
    return "".join(out).encode()[:BLOCK]


def workload(mib: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    kinds = ["text"] * 4 + ["random"] * 3 + ["zeros"]
    blocks = []
    for i in range(mib * 1024 * 1024 // BLOCK):
        kind = kinds[i % len(kinds)]
        if kind == "text":
            blocks.append(text_block(rng))
        elif kind == "random":
            blocks.append(rng.randbytes(BLOCK))
        else:
            blocks.append(bytes(BLOCK))
    return blocks


# ------------------------------------------------------------------ the gateways' process


async def serve_gateways(sim_port: int, algorithm: str, level: int, pki_dir: Path) -> None:
    from gateway.config import (  # noqa: PLC0415
        Address,
        ClientConfig,
        CompressionSettings,
        ServerConfig,
        TLSSettings,
    )
    from gateway.edges.client_gateway import ClientGateway  # noqa: PLC0415
    from gateway.edges.server_gateway import ServerGateway  # noqa: PLC0415
    from gateway.pki.ca import make_demo_pki  # noqa: PLC0415 - child process only

    paths = make_demo_pki(pki_dir, force=True)
    compression = CompressionSettings(algorithm, level)  # type: ignore[arg-type]
    loopback = Address("127.0.0.1", 0)
    server = ServerGateway(
        ServerConfig(
            tls=TLSSettings(paths.server_cert, paths.server_key, paths.ca_cert),
            listen=(loopback,),
            upstream=Address("127.0.0.1", sim_port),
            compression=compression,
        )
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve)
        port = listeners[0].socket.getsockname()[1]
        client = ClientGateway(
            ClientConfig(
                tls=TLSSettings(paths.client_cert, paths.client_key, paths.ca_cert),
                server=Address("127.0.0.1", port),
                server_name="localhost",
                listen=(loopback,),
                compression=compression,
            )
        )
        listeners = await nursery.start(client.serve)
        print(f"ready {listeners[0].socket.getsockname()[1]}", flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            print(json.dumps(_stats(server, client)), flush=True)
        nursery.cancel_scope.cancel()


def _stats(*gateways: Any) -> dict[str, float]:
    stats = {"cpu": time.process_time()}
    for stage in ("input", "output"):
        for op in ("compress", "decompress"):
            stats[f"{op}_{stage}"] = sum(
                g.metrics.registry.get_sample_value(
                    f"usbip_gateway_compression_{stage}_bytes_total",
                    {"role": g.metrics.role, "operation": op},
                )
                or 0.0
                for g in gateways
            )
    return stats


# ------------------------------------------------------------------ this process


class Gateways:
    """The child process running one mode's gateway pair."""

    def __init__(self, mode: str, sim_port: int, level: int, pki_dir: Path) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.compression",
                "--serve",
                mode,
                "--sim-port",
                str(sim_port),
                "--level",
                str(level),
                "--pki",
                str(pki_dir),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        line = self._line()
        if not line.startswith("ready "):
            raise RuntimeError(f"gateways ({mode}) did not start: {line!r}")
        self.port = int(line.split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def stats(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        result: dict[str, float] = json.loads(self._line())
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Run:
    seconds: float
    cpu: float
    ratio: float

    def mib_per_s(self, payload: int) -> float:
        return payload / self.seconds / 2**20


async def one_run(port: int, blocks: list[bytes]) -> float:
    from gateway.protocol import Direction, OpStatus  # noqa: PLC0415
    from gateway.usbip.importer import ImportRefused, import_device  # noqa: PLC0415

    # The previous run's session may still hold the simulator's device for a moment
    # (its close travels through both gateways): retry while it answers DEV_BUSY.
    deadline = trio.current_time() + 10
    while True:
        try:
            device = await import_device(
                await trio.open_tcp_stream("127.0.0.1", port), LOOPBACK_BUSID
            )
            break
        except ImportRefused as exc:
            if exc.status != OpStatus.DEV_BUSY or trio.current_time() > deadline:
                raise
            await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        started = time.perf_counter()
        for block in blocks:
            out = await device.submit(1, Direction.OUT, data=block)
            back = await device.submit(1, Direction.IN, length=len(block))
            if out.status != 0 or back.data != block:
                raise AssertionError("read back differs from what was written")
        elapsed = time.perf_counter() - started
        await device.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def bench(runs: int, mib: int, level: int) -> dict[str, list[Run]]:
    from gateway.sim.server import SimServer, serve_sim  # noqa: PLC0415

    blocks = workload(mib)
    results: dict[str, list[Run]] = {"none": [], "zstd": []}
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        async with trio.open_nursery() as nursery:
            sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
            sim_port = sim.addresses[0][1]
            pairs = {mode: Gateways(mode, sim_port, level, Path(tmp) / mode) for mode in results}
            try:
                for pair in pairs.values():  # warm-up, not counted
                    await one_run(pair.port, blocks[:16])
                for _ in range(runs):
                    for mode, pair in pairs.items():
                        before = pair.stats()
                        seconds = await one_run(pair.port, blocks)
                        after = pair.stats()
                        plain = after["compress_input"] - before["compress_input"]
                        wire = after["compress_output"] - before["compress_output"]
                        results[mode].append(
                            Run(
                                seconds, after["cpu"] - before["cpu"], plain / wire if wire else 1.0
                            )
                        )
            finally:
                for pair in pairs.values():
                    pair.close()
            nursery.cancel_scope.cancel()
    return results


def report(results: dict[str, list[Run]], runs: int, mib: int, level: int) -> str:
    payload = 2 * mib * 2**20  # OUT and back IN
    lines = [
        f"{mib} MiB out + {mib} MiB back in 64 KiB URBs (1/2 text, 3/8 random, 1/8 zeros), "
        f"zstd level {level}, median of {runs} runs",
        f"{'compression':<12} {'ratio':>6} {'MiB/s':>8} {'gateway CPU s':>14} "
        f"{'CPU s per GiB':>14}",
    ]
    for mode, items in results.items():
        ratio = statistics.median(r.ratio for r in items)
        speed = statistics.median(r.mib_per_s(payload) for r in items)
        cpu = statistics.median(r.cpu for r in items)
        lines.append(
            f"{mode:<12} {ratio:>6.2f} {speed:>8.1f} {cpu:>14.2f} {cpu / (payload / 2**30):>14.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32, help="MiB written (and read back) per run")
    parser.add_argument("--level", type=int, default=3, help="zstd level (1..19)")
    parser.add_argument("--json", action="store_true", help="print the raw runs as JSON too")
    parser.add_argument("--serve", choices=("none", "zstd"), help=argparse.SUPPRESS)
    parser.add_argument("--sim-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        logging.disable(logging.WARNING)  # e.g. "no policy file": expected here
        trio.run(serve_gateways, args.sim_port, args.serve, args.level, args.pki)
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = trio.run(bench, args.runs, args.mib, args.level)
    print(report(results, args.runs, args.mib, args.level))
    if args.json:
        print(json.dumps({m: [vars(r) for r in rs] for m, rs in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
