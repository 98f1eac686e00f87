"""Host-side processes for the scenarios (gateway server/client, simulator), under trio.

Each process logs to a file; start() returns once its stderr shows the ready line
("listening on"), bounded by a timeout, never after a fixed sleep."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .guest import free_port, tail

REPO = Path(__file__).resolve().parents[2]
READY = b"listening on"
PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\bWARNING\b|\berror\b", re.IGNORECASE)


@dataclass
class HostProcess:
    name: str
    argv: list[str]
    log: Path
    proc: trio.Process
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def problems(self) -> list[str]:
        """Log lines that look like warnings, errors or tracebacks."""
        return [ln for ln in self.log_text().splitlines() if PROBLEM.search(ln)]


class HostProcesses:
    """Starts processes in a nursery; stops them all (TERM, then KILL) on exit."""

    def __init__(self, nursery: trio.Nursery, log_dir: Path) -> None:
        self.nursery = nursery
        self.log_dir = log_dir
        self.procs: list[HostProcess] = []

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        ready_timeout: float = 30.0,
        ready_port: int | None = None,
    ) -> HostProcess:
        """Start argv; return once it logged "listening on" (or, only when ready_port is
        given, once that port accepts TCP connections)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        hp = HostProcess(name, list(argv), log, proc)
        self.procs.append(hp)
        self.nursery.start_soon(self._pump, hp)
        with trio.move_on_after(ready_timeout):
            async with trio.open_nursery() as n:

                async def wait_exit() -> None:
                    await hp.exited.wait()
                    n.cancel_scope.cancel()

                async def wait_ready() -> None:
                    await hp.ready.wait()
                    n.cancel_scope.cancel()

                async def wait_port(port: int) -> None:
                    while True:
                        try:
                            stream = await trio.open_tcp_stream("127.0.0.1", port)
                        except OSError:
                            await trio.sleep(0.1)
                            continue
                        await stream.aclose()
                        hp.ready.set()
                        n.cancel_scope.cancel()
                        return

                n.start_soon(wait_exit)
                n.start_soon(wait_ready)
                if ready_port is not None:
                    n.start_soon(wait_port, ready_port)
        if not hp.ready.is_set():
            state = f"exited {proc.returncode}" if hp.exited.is_set() else "still running"
            raise AssertionError(
                f"{name} did not log {READY.decode()!r} within {ready_timeout}s ({state})\n"
                f"argv: {' '.join(argv)}\n--- {log.name} ---\n{tail(log)}"
            )
        return hp

    async def _pump(self, hp: HostProcess) -> None:
        assert hp.proc.stdout is not None
        pending = b""
        with hp.log.open("ab") as fh:
            while True:
                chunk = await hp.proc.stdout.receive_some(65536)
                if not chunk:
                    break
                fh.write(chunk)
                fh.flush()
                pending = (pending + chunk)[-4096:]
                if not hp.ready.is_set() and READY in pending:
                    hp.ready.set()
        await hp.proc.wait()
        hp.exited.set()

    async def stop_all(self, grace: float = 5.0) -> None:
        for hp in reversed(self.procs):
            if hp.proc.returncode is None:
                hp.proc.terminate()
            with trio.move_on_after(grace):
                await hp.proc.wait()
            if hp.proc.returncode is None:
                hp.proc.kill()
                await hp.proc.wait()

    def unexpected_exits(self) -> list[str]:
        return [
            f"{hp.name} exited {hp.proc.returncode}\n{tail(hp.log, 30)}"
            for hp in self.procs
            if hp.proc.returncode is not None
        ]

    def problems(self) -> dict[str, list[str]]:
        return {hp.name: hp.problems() for hp in self.procs if hp.problems()}


@asynccontextmanager
async def host_processes(log_dir: Path) -> AsyncIterator[HostProcesses]:
    async with trio.open_nursery() as nursery:
        procs = HostProcesses(nursery, log_dir)
        try:
            yield procs
        finally:
            with trio.CancelScope(shield=True):
                await procs.stop_all()
            nursery.cancel_scope.cancel()


def gateway_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def check_gateway_cli() -> str | None:
    """None if `python -m gateway server --help` works, else why not."""
    proc = subprocess.run(
        gateway_argv("server", "--help"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        return f"`python -m gateway server --help` failed ({proc.returncode}): {proc.stderr}"
    return None


@dataclass
class GatewayPair:
    certs: Path
    server_port: int
    client_port: int
    server: HostProcess
    client: HostProcess


async def make_demo_certs(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    proc = await trio.run_process(
        gateway_argv("certs", "demo", "--dir", str(directory)),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"`gateway certs demo` failed ({proc.returncode}): {proc.stderr.decode()}"
        )
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        if not (directory / name).exists():
            raise AssertionError(f"`gateway certs demo` did not write {name}")
    return directory


async def start_gateway_pair(
    procs: HostProcesses,
    certs: Path,
    upstream_port: int,
    extra: Sequence[str] = (),
    server_extra: Sequence[str] = (),
) -> GatewayPair:
    """server gw (TLS in, upstream usbipd out) + client gw (plain in, TLS out)."""
    sport, cport = free_port(), free_port()
    while cport == sport:
        cport = free_port()
    server = await procs.start(
        "gw-server",
        gateway_argv(
            "server",
            "--listen", f"127.0.0.1:{sport}",
            "--upstream", f"127.0.0.1:{upstream_port}",
            "--cert", str(certs / "server.pem"),
            "--key", str(certs / "server.key"),
            "--ca", str(certs / "ca.pem"),
            *extra,
            *server_extra,
        ),
    )  # fmt: skip
    client = await procs.start(
        "gw-client",
        gateway_argv(
            "client",
            "--listen", f"127.0.0.1:{cport}",
            "--server", f"127.0.0.1:{sport}",
            "--server-name", "localhost",
            "--cert", str(certs / "client.pem"),
            "--key", str(certs / "client.key"),
            "--ca", str(certs / "ca.pem"),
            *extra,
        ),
    )  # fmt: skip
    return GatewayPair(certs, sport, cport, server, client)


async def start_client_gateway(
    procs: HostProcesses, name: str, certs: Path, identity: str, server_port: int
) -> int:
    """Another client gateway, with identity `identity` (certs/IDENTITY.pem), to the
    same server gateway; returns its port."""
    port = free_port()
    await procs.start(
        name,
        gateway_argv(
            "client",
            "--listen", f"127.0.0.1:{port}",
            "--server", f"127.0.0.1:{server_port}",
            "--server-name", "localhost",
            "--cert", str(certs / f"{identity}.pem"),
            "--key", str(certs / f"{identity}.key"),
            "--ca", str(certs / "ca.pem"),
        ),
    )  # fmt: skip
    return port


async def issue_client_cert(certs: Path, name: str) -> None:
    proc = await trio.run_process(
        gateway_argv("certs", "issue", "--dir", str(certs), "--kind", "client", "--name", name),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(f"`gateway certs issue` failed: {proc.stderr.decode()}")


async def start_sim(
    procs: HostProcesses,
    extra: Sequence[str] = (),
    ready_by_connect: bool = False,
    ready_timeout: float = 30.0,
) -> tuple[HostProcess, int]:
    """`gateway sim` on a free port. ready_by_connect also accepts a connectable port as
    ready (for a sim that does not log its "listening on" line)."""
    port = free_port()
    sim = await procs.start(
        "sim",
        gateway_argv("sim", "--listen", f"127.0.0.1:{port}", *extra),
        ready_timeout=ready_timeout,
        ready_port=port if ready_by_connect else None,
    )
    return sim, port


async def usbip_list(port: int, host: str = "127.0.0.1", timeout: float = 30) -> str:
    """`usbip --tcp-port PORT list -r HOST` on the host (Debian's usbip tools)."""
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            ["usbip", "--tcp-port", str(port), "list", "-r", host],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"usbip list via port {port} failed ({proc.returncode}):\n{out}")
    return out
