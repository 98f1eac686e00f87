"""Reverse mode through a NAT: a device host that no one can reach dials out.

Three network namespaces made by the test (private 10.78.x addresses that exist only
inside them; nothing leaves this machine):

    device 10.78.1.2 --- 10.78.1.1 router 10.78.2.1 --- 10.78.2.2 bench

The router masquerades what the device sends toward the bench and forwards nothing the
other way that the device did not start (nftables: forward policy drop, established and
related accepted). The device runs the USB/IP simulator and a server gateway that dials
the bench's client gateway; the bench has a route to the device's network, so a direct
connection is tried and dropped by the router. Real processes, real TLS, real kernel
networking.

Needs root, iproute2 and nftables (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..pkitools import PKI
from .test_mptcp_failover import REPO, START_TIMEOUT, Lines

DEVICE, ROUTER_DEVICE_SIDE = "10.78.1.2", "10.78.1.1"
BENCH, ROUTER_BENCH_SIDE = "10.78.2.2", "10.78.2.1"
DIAL_IN_PORT = 3250
LOCAL_PORT = 3245  # the bench's plain USB/IP port for the device host
SIM_PORT = 3241
PROBE_TIMEOUT = 30.0
REATTACH_BOUND = 5.0

NFT_RULES = """
table ip usbipgw {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "r1" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "r0" oifname "r1" accept
    }
}
"""
POLICY = 'allow busid "1-2" client-cn "test-client"\ndefault reject\n'


def _run(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {result.stderr.strip()}")


@dataclass
class Lab:
    tag: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"usbipgw-{name}{self.tag}"

    def ip(self, name: str, *args: str) -> None:
        _run("ip", "-n", self.ns(name), *args)

    def start(self, name: str, *args: str) -> Lines:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), sys.executable, *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        return Lines(f"{name}: {' '.join(args[:3])}", proc.stdout)

    def probe(self, *args: str) -> str:
        result = subprocess.run(
            [
                *("ip", "netns", "exec", self.ns("bench"), sys.executable),
                *("-m", "tests.netns.reverse_probe", *args),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
        return (result.stdout.strip().splitlines() or [result.stderr.strip()])[-1]


def _setup(lab: Lab) -> None:
    for name in ("device", "router", "bench"):
        _run("ip", "netns", "add", lab.ns(name))
        lab.ip(name, "link", "set", "lo", "up")
    lab.ip("device", "link", "add", "d0", "type", "veth", "peer", "name", "r0")
    lab.ip("device", "link", "set", "r0", "netns", lab.ns("router"))
    lab.ip("bench", "link", "add", "b0", "type", "veth", "peer", "name", "r1")
    lab.ip("bench", "link", "set", "r1", "netns", lab.ns("router"))
    for name, dev, address in (
        ("device", "d0", DEVICE),
        ("router", "r0", ROUTER_DEVICE_SIDE),
        ("router", "r1", ROUTER_BENCH_SIDE),
        ("bench", "b0", BENCH),
    ):
        lab.ip(name, "addr", "add", f"{address}/24", "dev", dev)
        lab.ip(name, "link", "set", dev, "up")
    lab.ip("device", "route", "add", "default", "via", ROUTER_DEVICE_SIDE)
    # The bench knows the way: a direct connection is tried, and the router drops it.
    lab.ip("bench", "route", "add", "10.78.1.0/24", "via", ROUTER_BENCH_SIDE)
    _run("ip", "netns", "exec", lab.ns("router"), "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _run("ip", "netns", "exec", lab.ns("router"), "nft", "-f", "-", stdin=NFT_RULES)


@pytest.fixture
def lab() -> Iterator[Lab]:
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.fail(f"the reverse NAT test needs `{tool}`: apt-get install iproute2 nftables")
    if os.geteuid() != 0:
        pytest.fail("the network namespace tests need root (CAP_NET_ADMIN) for `ip netns`")
    lab = Lab(str(os.getpid()))
    try:
        _setup(lab)
        yield lab
    finally:
        for proc in lab.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        for name in ("device", "router", "bench"):
            subprocess.run(["ip", "netns", "del", lab.ns(name)], check=False, timeout=30)


def _configs(pki: PKI, tmp: Path) -> tuple[Path, Path, Path]:
    policy = tmp / "policy.rules"
    policy.write_text(POLICY)
    audit = tmp / "audit.jsonl"
    tls = f'[tls]\nca = "{pki.ca_pem}"\n'
    server = tmp / "server.toml"
    server.write_text(
        f'[server]\nupstream = "127.0.0.1:{SIM_PORT}"\nconnect_timeout = 1.0\n'
        f'[reverse]\ndial = "{BENCH}:{DIAL_IN_PORT}"\nname = "client.test"\n'
        "keepalive = 1.0\nbackoff_max = 1.0\n"
        f'[policy]\nfile = "{policy}"\n[audit]\npath = "{audit}"\n[log]\nformat = "json"\n'
        f'{tls}cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
    )
    client = tmp / "client.toml"
    client.write_text(
        f'[client]\nserver = "{DEVICE}:3240"\nlisten = "127.0.0.1:3240"\n'
        f'[reverse]\nlisten = "0.0.0.0:{DIAL_IN_PORT}"\n'
        f'servers = "localhost=127.0.0.1:{LOCAL_PORT}"\nkeepalive = 1.0\n[log]\nformat = "json"\n'
        f'{tls}cert = "{pki.client_cert}"\nkey = "{pki.client_key}"\n'
    )
    return server, client, audit


def _is(message: str) -> object:
    def match(line: str) -> bool:
        try:
            return message in str(json.loads(line).get("message", ""))
        except ValueError:
            return message in line

    return match


def test_a_device_host_behind_nat_dials_out_and_serves(lab: Lab, pki: PKI, tmp_path: Path) -> None:
    server_toml, client_toml, audit = _configs(pki, tmp_path)
    sim = lab.start("device", "-m", "gateway", "sim", "--listen", f"0.0.0.0:{SIM_PORT}")
    sim.wait_for(_is("listening on"), START_TIMEOUT, "the simulator listening")
    client = lab.start("bench", "-m", "gateway", "client", "--config", str(client_toml))
    client.wait_for(_is("for server gateways dialing in"), START_TIMEOUT, "dial-in listener")
    server = lab.start("device", "-m", "gateway", "server", "--config", str(server_toml))

    # No way in: the device's own listener cannot be reached from the bench.
    assert lab.probe("direct", DEVICE, str(SIM_PORT)).startswith("unreachable")

    # Through the dialed-out connections: list, import and byte-exact URBs; the policy
    # still hides and refuses what it should.
    deadline = time.monotonic() + START_TIMEOUT
    while (listed := lab.probe("list", str(LOCAL_PORT))) != "listed 1-2":
        assert time.monotonic() < deadline, f"no listing through the reverse link: {listed}"
        time.sleep(0.2)
    assert lab.probe("import", str(LOCAL_PORT), "1-2") == "ok 8"
    assert lab.probe("import", str(LOCAL_PORT), "1-1").startswith("refused")

    # Cut the device's uplink until the server gateway notices, then restore it.
    lab.ip("router", "link", "set", "r0", "down")
    deadline = time.monotonic() + START_TIMEOUT
    while lab.probe("list", str(LOCAL_PORT)).startswith("listed"):
        assert time.monotonic() < deadline, "the bench still lists through a cut link"
        time.sleep(0.2)
    # Its idle connections went unanswered: dropped, to be dialed anew.
    server.wait_for(_is("dropped: no answer to a keepalive"), START_TIMEOUT, "a drop")
    lab.ip("router", "link", "set", "r0", "up")
    restored = time.monotonic()
    while (result := lab.probe("import", str(LOCAL_PORT), "1-2")) != "ok 8":
        assert time.monotonic() - restored < REATTACH_BOUND, f"no attach after restore: {result}"
    elapsed = time.monotonic() - restored
    assert elapsed < REATTACH_BOUND
    print(f"attach after restoring the link: {elapsed:.2f}s")  # shown with -s

    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    ends = [r for r in records if r.get("event") == "session_end"]
    assert ends
    assert all(r["dialer"] == "server" for r in ends), ends
    assert {r["request"] for r in ends} == {"devlist", "import"}
