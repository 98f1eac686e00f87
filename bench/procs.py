"""The processes a path runs through, and what they cost (CPU time, peak RSS).

Every path between the load generator and the simulator is one or two child processes
started here: the gateway pair (plain, mutual TLS, TLS + zstd), a stunnel pair, a socat
pair. Also two bench-only programs run as children:

    python -m bench.procs sim --devices N --listen 127.0.0.1:PORT
    python -m bench.procs plain --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT

`sim` is the simulator with N Gadget Zero source/sink devices (bus ids 1-1 .. 1-100,
2-1 ...; pattern mod 63, so the sink checks every byte written). `plain` is one
gateway's relay (`gateway.relay.pumps.relay` with a `Splice`: every frame parsed and checked)
over plain TCP, with no TLS and no policy: the parsing cost alone. It exists only here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def busid(index: int) -> str:
    """The bus id of the bench simulator's device `index` (0-based)."""
    return f"{1 + index // 100}-{1 + index % 100}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime from /proc/PID/stat (plus reaped children's, for socat's forks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mib(pid: int) -> float:
    """VmRSS: the resident memory of the process now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mib(pid: int) -> float:
    """Current RSS of a process and its direct children (socat forks one per connection)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            resident = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
        total += resident * PAGE / 2**20
    return total


async def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout}s") from None
            await trio.sleep(0.05)


@dataclass
class Path_:
    """One way from the load generator to the simulator."""

    name: str
    port: int  # where the load generator connects
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    forks: bool = False  # socat: the work happens in reaped children

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid, children=self.forks) for pid in self.pids)

    def rss(self) -> list[float]:
        """Resident memory of each process now (with its children, for forking paths)."""
        if self.forks:
            return [tree_rss_mib(pid) for pid in self.pids]
        return [rss_mib(pid) for pid in self.pids]

    def peak_rss(self) -> list[float]:
        if self.forks:
            return [tree_rss_mib(pid) for pid in self.pids]
        return [peak_rss_mib(pid) for pid in self.pids]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Launcher:
    """Starts the processes of each path, logging to `logs`."""

    def __init__(self, logs: Path, pki: Path) -> None:
        self.logs = logs
        self.pki = pki
        logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, argv: list[str], root: Path = ROOT) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(root))
        with (self.logs / f"{name}.log").open("wb") as log:  # the child keeps its copy
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
                env=env,
            )

    async def sim(self, devices: int) -> Path_:
        port = free_port()
        proc = self.spawn(
            "sim",
            [
                sys.executable,
                "-m",
                "bench.procs",
                "sim",
                "--devices",
                str(devices),
                "--listen",
                f"{LOOPBACK}:{port}",
            ],
        )
        await wait_listening(port)
        return Path_("sim", port, [proc])

    async def direct(self, sim: Path_) -> Path_:
        return Path_("direct", sim.port)

    async def plain(self, sim: Path_) -> Path_:
        server, client = free_port(), free_port()
        procs = []
        for name, listen, upstream in (
            ("plain-server", server, sim.port),
            ("plain-client", client, server),
        ):
            procs.append(
                self.spawn(
                    name,
                    [
                        sys.executable,
                        "-m",
                        "bench.procs",
                        "plain",
                        "--listen",
                        f"{LOOPBACK}:{listen}",
                        "--upstream",
                        f"{LOOPBACK}:{upstream}",
                    ],
                )
            )
            await wait_listening(listen)
        return Path_("gateway plain", client, procs)

    async def gateways(self, sim: Path_, *, zstd: bool, root: Path = ROOT, tag: str = "") -> Path_:
        """The gateway pair with mutual TLS; `root` holds the `gateway` package to run."""
        server, client = free_port(), free_port()
        extra = ["--compression", "zstd"] if zstd else []
        name = ("gateway mTLS+zstd" if zstd else "gateway mTLS") + tag
        log = name.replace(" ", "-").replace("(", "").replace(")", "")
        pki = self.pki
        server_argv = [
            sys.executable, "-m", "gateway", "server", "--listen", f"{LOOPBACK}:{server}",
            "--upstream", f"{LOOPBACK}:{sim.port}", "--cert", str(pki / "server.pem"),
            "--key", str(pki / "server.key"), "--ca", str(pki / "ca.pem"),
            "--log-level", "warning", *extra,
        ]  # fmt: skip
        client_argv = [
            sys.executable, "-m", "gateway", "client", "--listen", f"{LOOPBACK}:{client}",
            "--server", f"{LOOPBACK}:{server}", "--server-name", "localhost",
            "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"),
            "--ca", str(pki / "ca.pem"), "--log-level", "warning", *extra,
        ]  # fmt: skip
        server_proc = self.spawn(f"{log}-server", server_argv, root)
        await wait_listening(server)
        client_proc = self.spawn(f"{log}-client", client_argv, root)
        await wait_listening(client)
        return Path_(name, client, [client_proc, server_proc])

    async def stunnel(self, sim: Path_) -> Path_:
        server, client = free_port(), free_port()
        pki = self.pki
        common = "foreground = yes\npid =\ndebug = 4\n"
        sides = {
            "stunnel-server": (
                f"{common}[usbip]\naccept = {LOOPBACK}:{server}\nconnect = {LOOPBACK}:{sim.port}\n"
                f"cert = {pki / 'server.pem'}\nkey = {pki / 'server.key'}\n"
                f"CAfile = {pki / 'ca.pem'}\nverifyChain = yes\nrequireCert = yes\n"
                "sslVersionMin = TLSv1.3\n"
                "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                server,
            ),
            "stunnel-client": (
                f"{common}[usbip]\nclient = yes\naccept = {LOOPBACK}:{client}\n"
                f"connect = {LOOPBACK}:{server}\ncert = {pki / 'client.pem'}\n"
                f"key = {pki / 'client.key'}\nCAfile = {pki / 'ca.pem'}\nverifyChain = yes\n"
                "checkHost = localhost\nsslVersionMin = TLSv1.3\n"
                "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                client,
            ),
        }
        procs = []
        for name, (text, port) in sides.items():
            conf = self.logs / f"{name}.conf"
            conf.write_text(text)
            procs.append(self.spawn(name, ["stunnel", str(conf)]))
            await wait_listening(port)
        return Path_("stunnel", client, procs[::-1])

    async def socat(self, sim: Path_) -> Path_:
        server, client = free_port(), free_port()
        procs = []
        for name, listen, upstream in (
            ("socat-server", server, sim.port),
            ("socat-client", client, server),
        ):
            procs.append(
                self.spawn(
                    name,
                    [
                        "socat",
                        f"TCP-LISTEN:{listen},bind={LOOPBACK},reuseaddr,fork,nodelay,backlog=512",
                        f"TCP:{LOOPBACK}:{upstream},nodelay",
                    ],
                )
            )
            await wait_listening(listen)
        return Path_("socat", client, procs[::-1], forks=True)


# ------------------------------------------------------------------ child programs


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def _serve_sim(devices: int, host: str, port: int) -> None:
    from gateway.sim.gadget_zero import Pattern, SourceSink  # noqa: PLC0415
    from gateway.sim.server import SimServer, serve_sim  # noqa: PLC0415

    sim = SimServer(
        [
            SourceSink(
                busid=busid(i),
                busnum=1 + i // 100,
                devnum=2 + i % 100,
                serial=f"SIM-SS-{i:04d}",
                pattern=Pattern.MOD63,
                isochronous=False,
            )
            for i in range(devices)
        ]
    )
    await serve_sim(sim, host=host, port=port)


async def _serve_plain(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    from gateway.accounting.session import Session  # noqa: PLC0415
    from gateway.protocol import Splice  # noqa: PLC0415
    from gateway.relay.pumps import relay  # noqa: PLC0415

    async def handle(stream: trio.SocketStream) -> None:
        try:
            up = await trio.open_tcp_stream(*upstream)
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        session = Session("plain", "", "", time.time())
        await relay(Splice(cut_through=True), stream, up, session)

    await trio.serve_tcp(handle, listen[1], host=listen[0])


def main() -> int:
    parser = argparse.ArgumentParser(description="bench-only child programs")
    sub = parser.add_subparsers(dest="program", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--devices", type=int, default=101)
    sim.add_argument("--listen", type=_address, required=True)
    plain = sub.add_parser("plain")
    plain.add_argument("--listen", type=_address, required=True)
    plain.add_argument("--upstream", type=_address, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.program == "sim":
            trio.run(_serve_sim, args.devices, *args.listen)
        else:
            trio.run(_serve_plain, args.listen, args.upstream)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
