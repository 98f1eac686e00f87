"""MPTCP between the gateways survives losing a path; plain TCP does not.

Two network namespaces made by the test, "client" and "server", joined by two veth pairs
(two paths, private 10.77.x addresses that exist only inside these namespaces: nothing
leaves this machine). In the server namespace: the USB/IP simulator and the server
gateway; in the client namespace: the client gateway and a load client writing patterns
to the loopback device 1-2 and reading them back. Mid-transfer the first path's link goes
down. With MPTCP (and the kernel path manager adding a subflow on the second path) every
round still comes back byte for byte; without it the session dies.

Both namespaces set net.ipv4.tcp_retries2 = 3, so a TCP connection (or MPTCP subflow)
whose path is gone gives up in seconds instead of fifteen minutes: that is what lets the
plain-TCP case end within the test's bounds.

Needs root and iproute2 (`ip netns`, `ip mptcp`). Skipped only when the kernel has no
MPTCP (then only the MPTCP case is skipped, and it says so).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from ..pkitools import PKI

REPO = Path(__file__).resolve().parents[2]
PATHS = (("10.77.1.1", "10.77.1.2"), ("10.77.2.1", "10.77.2.2"))  # (client, server) per path
PORT = 3240
SIM_PORT = 3241
START_TIMEOUT = 30.0
SUBFLOW_TIMEOUT = 15.0
RUN_TIMEOUT = 90.0
ROUNDS_BEFORE_DOWN = 20
ROUNDS_AFTER_DOWN = 30


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _require_tools() -> None:
    if shutil.which("ip") is None:
        pytest.fail("the network namespace tests need `ip`: apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.fail("the network namespace tests need root (CAP_NET_ADMIN) for `ip netns`")


class Lines:
    """A pipe read by a thread; waits on it are bounded."""

    def __init__(self, name: str, pipe: IO[str]) -> None:
        self.name = name
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {what} within {timeout:g}s:\n{self.text()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{self.name} ended before {what}:\n{self.text()}")
            self.seen.append(line)
            if predicate(line):
                return line

    def drain(self, timeout: float) -> None:
        """Everything up to the end of the pipe (the process has been stopped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return
            if line is None:
                return
            self.seen.append(line)

    def text(self) -> str:
        return "\n".join(self.seen[-60:])


@dataclass
class Netns:
    client: str
    server: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def ip(self, ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    def sysctl(self, ns: str, key: str, value: str) -> bool:
        path = "/proc/sys/" + key.replace(".", "/")
        result = _run("ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}", check=False)
        return result.returncode == 0

    def start(self, ns: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *args],
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes.append(proc)
        return proc


def _setup(ns: Netns) -> None:
    for name in (ns.client, ns.server):
        _run("ip", "netns", "add", name)
        ns.ip(name, "link", "set", "lo", "up")
        ns.sysctl(name, "net.ipv4.tcp_retries2", "3")
    for i, (client_addr, server_addr) in enumerate(PATHS, start=1):
        ns.ip(ns.client, "link", "add", f"c{i}", "type", "veth", "peer", "name", f"s{i}")
        ns.ip(ns.client, "link", "set", f"s{i}", "netns", ns.server)
        ns.ip(ns.client, "addr", "add", f"{client_addr}/24", "dev", f"c{i}")
        ns.ip(ns.server, "addr", "add", f"{server_addr}/24", "dev", f"s{i}")
        ns.ip(ns.client, "link", "set", f"c{i}", "up")
        ns.ip(ns.server, "link", "set", f"s{i}", "up")


def _enable_mptcp(ns: Netns) -> None:
    if not Path("/proc/sys/net/mptcp/enabled").exists():
        pytest.skip("this kernel has no MPTCP (/proc/sys/net/mptcp missing): failover not tested")
    for name in (ns.client, ns.server):
        if not ns.sysctl(name, "net.mptcp.enabled", "1"):
            pytest.skip("MPTCP is disabled in this kernel and cannot be enabled: not tested")
        ns.ip(name, "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
    # The client opens a subflow from its second address; the server announces its own.
    ns.ip(ns.client, "mptcp", "endpoint", "add", PATHS[1][0], "dev", "c2", "subflow")
    ns.ip(ns.server, "mptcp", "endpoint", "add", PATHS[1][1], "dev", "s2", "signal")


@pytest.fixture
def netns() -> Iterator[Netns]:
    _require_tools()
    tag = f"{os.getpid()}"
    ns = Netns(client=f"usbipgw-c{tag}", server=f"usbipgw-s{tag}")
    try:
        _setup(ns)
        yield ns
    finally:
        for proc in ns.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for name in (ns.client, ns.server):
            _run("ip", "netns", "del", name, check=False)


@dataclass
class Running:
    ns: Netns
    sim: Lines
    server: Lines
    client: Lines
    server_proc: subprocess.Popen[str]
    client_proc: subprocess.Popen[str]


def _listening(line: str) -> bool:
    return "listening on" in line


def _start_stack(ns: Netns, pki: PKI, *, mptcp: bool) -> Running:
    sim_proc = ns.start(ns.server, "-m", "gateway", "sim", "--listen", f"127.0.0.1:{SIM_PORT}")
    assert sim_proc.stdout is not None
    sim = Lines("sim", sim_proc.stdout)
    sim.wait_for(_listening, START_TIMEOUT, "listening line")
    common = [
        "--log-format",
        "json",
        "--shutdown-timeout",
        "2",
        "--compression",
        "zstd",
        "--ca",
        str(pki.ca_pem),
        *(["--mptcp"] if mptcp else []),
    ]
    server_proc = ns.start(
        ns.server,
        "-m",
        "gateway",
        "server",
        "--listen",
        f"0.0.0.0:{PORT}",
        "--upstream",
        f"127.0.0.1:{SIM_PORT}",
        "--cert",
        str(pki.server_cert),
        "--key",
        str(pki.server_key),
        *common,
    )
    assert server_proc.stdout is not None
    server = Lines("server gateway", server_proc.stdout)
    server.wait_for(_listening, START_TIMEOUT, "listening line")
    client_proc = ns.start(
        ns.client,
        "-m",
        "gateway",
        "client",
        "--listen",
        f"127.0.0.1:{PORT}",
        "--server",
        f"{PATHS[0][1]}:{PORT}",
        "--server-name",
        "localhost",
        "--cert",
        str(pki.client_cert),
        "--key",
        str(pki.client_key),
        *common,
    )
    assert client_proc.stdout is not None
    client = Lines("client gateway", client_proc.stdout)
    client.wait_for(_listening, START_TIMEOUT, "listening line")
    return Running(ns, sim, server, client, server_proc, client_proc)


def _session_end(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and str(entry.get("message", "")).startswith("session end"):
        return entry
    return None


def _transfer_and_cut(running: Running, monitor: Lines | None) -> Lines:
    """Start the load; once it runs (and the second subflow is up), take path 1 down."""
    ns = running.ns
    load_proc = ns.start(
        ns.client,
        "-m",
        "tests.netns.loadgen",
        str(PORT),
        f"--after={ROUNDS_AFTER_DOWN}",
        stdin=True,
    )
    assert load_proc.stdout is not None
    assert load_proc.stdin is not None
    load = Lines("load client", load_proc.stdout)
    if monitor is not None:
        monitor.wait_for(
            lambda line: "SF_ESTABLISHED" in line and f"saddr4={PATHS[1][0]}" in line,
            SUBFLOW_TIMEOUT,
            "MPTCP subflow on the second path (ip mptcp monitor SF_ESTABLISHED)",
        )
    line = load.wait_for(
        lambda line: line.startswith((f"round {ROUNDS_BEFORE_DOWN} ok", "error:", "done")),
        RUN_TIMEOUT,
        f"round {ROUNDS_BEFORE_DOWN}",
    )
    assert line.endswith(" ok"), load.text()
    # The load keeps running while the link goes down: URBs are in flight on the path.
    ns.ip(ns.client, "link", "set", "c1", "down")
    load_proc.stdin.write("continue\n")
    load_proc.stdin.flush()
    return load


def _stop(running: Running) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SIGTERM both gateways; their session-end records."""
    for proc in (running.client_proc, running.server_proc):
        proc.terminate()
    ends: list[list[dict[str, Any]]] = []
    for proc, lines in (
        (running.client_proc, running.client),
        (running.server_proc, running.server),
    ):
        proc.wait(timeout=START_TIMEOUT)
        lines.drain(5)
        ends.append([e for e in map(_session_end, lines.seen) if e is not None])
    return ends[0], ends[1]


def test_mptcp_session_survives_losing_a_path(netns: Netns, pki: PKI) -> None:
    _enable_mptcp(netns)
    monitor_proc = subprocess.Popen(
        ["ip", "-n", netns.client, "mptcp", "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    netns.processes.append(monitor_proc)  # killed by the fixture
    assert monitor_proc.stdout is not None
    monitor = Lines("ip mptcp monitor", monitor_proc.stdout)
    running = _start_stack(netns, pki, mptcp=True)
    load = _transfer_and_cut(running, monitor)
    last = load.wait_for(
        lambda line: line.startswith(("error:", "done")), RUN_TIMEOUT, "end of the load"
    )
    assert last == "done", f"the load failed after path 1 went down:\n{load.text()}"
    rounds = [line for line in load.seen if line.startswith("round ")]
    assert rounds == [f"round {n} ok" for n in range(1, len(rounds) + 1)]
    assert len(rounds) >= ROUNDS_BEFORE_DOWN + ROUNDS_AFTER_DOWN
    client_ends, server_ends = _stop(running)
    imports = [e for e in client_ends + server_ends if e.get("request") == "import"]
    assert len(imports) == 2, (client_ends, server_ends)
    for entry in imports:
        assert entry["transport"] == "mptcp", entry
        assert entry["compression"] == "zstd", entry
        assert entry["outcome"].startswith("closed"), entry


def test_plain_tcp_session_dies_with_its_path(netns: Netns, pki: PKI) -> None:
    running = _start_stack(netns, pki, mptcp=False)
    load = _transfer_and_cut(running, None)
    last = load.wait_for(
        lambda line: line.startswith(("error:", "done")), RUN_TIMEOUT, "end of the load"
    )
    assert last.startswith("error:"), f"plain TCP survived the dead path?\n{load.text()}"
    client_ends, server_ends = _stop(running)
    imports = [e for e in client_ends + server_ends if e.get("request") == "import"]
    assert imports, (client_ends, server_ends)
    assert all(e["transport"] == "tcp" for e in imports), imports
    # The side with data in flight gives up (tcp_retries2) and ends its session.
    assert any(e["outcome"].startswith("connection lost") for e in imports), imports
