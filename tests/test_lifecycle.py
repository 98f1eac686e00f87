"""Certificate lifecycle through the real command line and real gateway processes: what
`certs revoke` tells the operator, certificates refused at start, SIGHUP rereading the
configuration file, and a revoked client's attached session closed on reload."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.cli import main
from gateway.pki.ca import (
    fingerprint_sha256,
    issue_server_cert,
    load_ca,
    make_crl,
    write_issued,
)
from gateway.protocol import Direction
from gateway.transport.tls import client_context
from gateway.usbip.importer import ImportedDevice, import_device, list_devices

from . import test_cli
from .test_cli import READY, START_TIMEOUT, Process

LOOPBACK = "127.0.0.1"


processes = test_cli.processes  # the fixture: processes started, killed at the end


def certs(*argv: str) -> None:
    assert main(["certs", *argv]) == 0


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A CA, two server certificates for localhost, two clients, an empty CRL."""
    d = tmp_path / "pki"
    certs("init", "--dir", str(d))
    for name in ("server", "server2"):
        certs("issue", "--dir", str(d), "--kind", "server", "--name", name, "--dns", "localhost")
    for name in ("alice", "bob"):
        certs("issue", "--dir", str(d), "--kind", "client", "--name", name)
    certs("crl", "--dir", str(d))
    return d


class Follow:
    """Every stderr line of a started process, read by a thread of its own (a select()
    on the pipe misses lines already in the reader's buffer)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.proc.stderr is not None
        for line in self.process.proc.stderr:
            self.process.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)

    def expect(self, pattern: str, timeout: float = START_TIMEOUT) -> str:
        """The next line that matches `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.process.lines))

    def stop(self) -> int:
        self.process.proc.send_signal(signal.SIGTERM)
        code = self.process.proc.wait(timeout=START_TIMEOUT)
        self.thread.join(timeout=START_TIMEOUT)
        return code


def start(processes: list[Process], *args: str) -> tuple[Follow, int]:
    """A started process, and the port from its own `listening on` line."""
    process = Process(*args)
    processes.append(process)
    follow = Follow(process)
    match = READY.search(follow.expect(READY.pattern))
    assert match is not None
    return follow, int(match.group(2))


async def probe(port: int, d: Path, name: str) -> tuple[str, list[str]]:
    """The server gateway's certificate fingerprint, and the bus ids it lists to `name`."""
    tcp = await trio.open_tcp_stream(LOOPBACK, port)
    context = client_context(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    devices = await list_devices(stream)
    return hashlib.sha256(der).hexdigest(), sorted(d.info.busid for d in devices)


def fingerprint(path: Path) -> str:
    return fingerprint_sha256(x509.load_pem_x509_certificate(path.read_bytes()))


# --- certs revoke ------------------------------------------------------------------------


def test_revoke_says_that_only_a_configured_crl_is_read(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    certs("revoke", "--dir", str(ca_dir), str(ca_dir / "bob.pem"))
    out = capsys.readouterr().out
    assert "1 revoked" in out
    assert "checks certificates against a CRL only if its configuration names it" in out
    assert f'crl = "{(ca_dir / "crl.pem").resolve()}"' in out
    assert "Without that, revoked certificates are still accepted" in out
    assert "send SIGHUP to the gateways to load it" not in out
    certs("crl", "--dir", str(ca_dir), "--days", "7")
    out = capsys.readouterr().out
    assert "valid for 7 days" in out
    assert "The CRL expires in 7 days: after that every client is refused" in out


# --- refused at start --------------------------------------------------------------------


def _issue_dated(d: Path, name: str, start: dt.datetime, days: int) -> None:
    issued = issue_server_cert(
        load_ca(d), common_name=name, dns_names=["localhost"], days=days, not_before=start
    )
    write_issued(issued, d / f"{name}.pem", d / f"{name}.key")


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("expired", "expired", r"certificate '.*expired\.pem' expired on \d{4}-\d\d-\d\d"),
        ("future", "future", r"certificate '.*future\.pem' is not valid until \d{4}"),
        (
            "alice",
            "alice",
            r"'.*alice\.pem' lacks the serverAuth extended key usage a server gateway needs "
            r"\(it is a client certificate\)",
        ),
        ("ca", "ca", r"certificate '.*ca\.pem' is a CA certificate, not a server gateway's"),
        ("server", "server2", r"the key '.*server2\.key' does not match the certificate"),
    ],
    ids=["expired", "not-yet-valid", "client-certificate", "ca-certificate", "other-key"],
)
def test_the_server_refuses_to_start_with_an_unfit_certificate(
    ca_dir: Path, cert: str, key: str, message: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    _issue_dated(ca_dir, "expired", now - dt.timedelta(days=40), 30)
    _issue_dated(ca_dir, "future", now + dt.timedelta(days=2), 30)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "server", "--listen", f"{LOOPBACK}:0",
         "--cert", str(ca_dir / f"{cert}.pem"), "--key", str(ca_dir / f"{key}.key"),
         "--ca", str(ca_dir / "ca.pem")],
        capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_the_client_refuses_a_server_certificate(ca_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "client", "--listen", f"{LOOPBACK}:0",
         "--server", f"{LOOPBACK}:1", "--cert", str(ca_dir / "server.pem"),
         "--key", str(ca_dir / "server.key"), "--ca", str(ca_dir / "ca.pem")],
        capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "lacks the clientAuth extended key usage" in result.stderr
    assert "(it is a server certificate)" in result.stderr


# --- SIGHUP rereads the configuration ------------------------------------------------------


def _server_toml(d: Path, sim_port: int, cert: str, policy: Path, *, timeout: int = 10) -> str:
    return (
        f'[server]\nlisten = "{LOOPBACK}:0"\nupstream = "{LOOPBACK}:{sim_port}"\n'
        f"handshake_timeout = {timeout}\n"
        f'[tls]\ncert = "{d / cert}.pem"\nkey = "{d / cert}.key"\nca = "{d / "ca.pem"}"\n'
        f"watch = false\n"
        f'[policy]\nfile = "{policy}"\n'
    )


def test_sighup_rereads_the_configuration_file(
    ca_dir: Path, tmp_path: Path, processes: list[Process]
) -> None:
    _, sim_port = start(processes, "sim", "--listen", f"{LOOPBACK}:0")
    hide, show = tmp_path / "hide.rules", tmp_path / "show.rules"
    hide.write_text('reject busid "1-1"\ndefault allow\n')
    show.write_text("default allow\n")
    toml = tmp_path / "server.toml"
    toml.write_text(_server_toml(ca_dir, sim_port, "server", hide))
    server, port = start(processes, "server", "--config", str(toml))
    assert trio.run(probe, port, ca_dir, "alice") == (
        fingerprint(ca_dir / "server.pem"),
        ["1-2", "1-3"],
    )

    # Other certificate and policy paths, and a setting only a restart changes.
    toml.write_text(_server_toml(ca_dir, sim_port, "server2", show, timeout=11))
    server.process.proc.send_signal(signal.SIGHUP)
    line = server.expect(r"configuration reloaded from")
    assert re.search(r"only after a restart \(running values kept\): server\.handshake_timeout$",
                     line.rstrip()), line  # fmt: skip
    server.expect(r"policy now from .*show\.rules")
    assert trio.run(probe, port, ca_dir, "alice") == (
        fingerprint(ca_dir / "server2.pem"),
        ["1-1", "1-2", "1-3"],
    )

    # A file that does not load keeps the running configuration (and its files).
    toml.write_text("[tls\n")
    server.process.proc.send_signal(signal.SIGHUP)
    server.expect(r"configuration reload from .*server\.toml failed, keeping the running")
    assert trio.run(probe, port, ca_dir, "alice") == (
        fingerprint(ca_dir / "server2.pem"),
        ["1-1", "1-2", "1-3"],
    )
    # A certificate unfit for the role keeps the running certificate.
    toml.write_text(_server_toml(ca_dir, sim_port, "alice", show))
    server.process.proc.send_signal(signal.SIGHUP)
    server.expect(r"TLS reload failed, keeping the previous certificates: .*alice\.pem' lacks")
    assert trio.run(probe, port, ca_dir, "alice")[0] == fingerprint(ca_dir / "server2.pem")
    assert server.stop() == 0


# --- a revoked client's attached session -------------------------------------------------


async def _attach(port: int, d: Path, name: str, busid: str) -> ImportedDevice:
    tcp = await trio.open_tcp_stream(LOOPBACK, port)
    context = client_context(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
    return await import_device(trio.SSLStream(tcp, context, server_hostname="localhost"), busid)


def test_sighup_closes_the_attached_sessions_of_a_revoked_certificate(
    ca_dir: Path, tmp_path: Path, processes: list[Process]
) -> None:
    _, sim_port = start(processes, "sim", "--listen", f"{LOOPBACK}:0")
    audit = tmp_path / "audit.jsonl"
    server, port = start(
        processes,
        "server",
        "--listen", f"{LOOPBACK}:0",
        "--upstream", f"{LOOPBACK}:{sim_port}",
        "--cert", str(ca_dir / "server.pem"),
        "--key", str(ca_dir / "server.key"),
        "--ca", str(ca_dir / "ca.pem"),
        "--crl", str(ca_dir / "crl.pem"),
        "--audit-log", str(audit),
    )  # fmt: skip

    async def scenario() -> None:
        alice = await _attach(port, ca_dir, "alice", "1-1")
        bob = await _attach(port, ca_dir, "bob", "1-2")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.serve)
            nursery.start_soon(bob.serve)
            assert not alice.closed.is_set()  # imported and enumerated
            certs("revoke", "--dir", str(ca_dir), str(ca_dir / "alice.pem"))
            server.process.proc.send_signal(signal.SIGHUP)
            with trio.fail_after(START_TIMEOUT):
                await alice.closed.wait()
            # Bob's session was not touched.
            assert (await bob.submit(1, Direction.OUT, data=b"after")).status == 0
            assert (await bob.submit(1, Direction.IN, length=5)).data == b"after"
            await bob.aclose()
            await alice.aclose()

    trio.run(scenario)
    serial = x509.load_pem_x509_certificate((ca_dir / "alice.pem").read_bytes()).serial_number
    line = server.expect(r"closing session \d+: client certificate revoked")
    assert f"serial {serial:x} in the CRL" in line
    assert server.stop() == 0
    records = [json.loads(r) for r in audit.read_text().splitlines()]
    revoked = [r for r in records if r["event"] == "session_revoked"]
    assert len(revoked) == 1
    assert revoked[0]["client"]["serial"] == f"{serial:x}"
    assert revoked[0]["device"] == {"busid": "1-1"}
    assert revoked[0]["closed"] is True
    assert "client certificate revoked" in revoked[0]["reason"]
    ends = {r["device"]["busid"]: r["outcome"] for r in records if r["event"] == "session_end"}
    assert ends["1-1"].startswith("client certificate revoked")
    assert "revoked" not in ends["1-2"]


# --- warned at start -----------------------------------------------------------------------


def test_start_warns_of_an_expired_crl_and_a_ca_near_its_end(
    tmp_path: Path, processes: list[Process]
) -> None:
    d = tmp_path / "short"
    certs("init", "--dir", str(d), "--days", "10")
    certs("issue", "--dir", str(d), "--kind", "server", "--name", "server", "--dns", "localhost")
    ca = load_ca(d)
    stale = make_crl(ca, [], days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    (d / "crl.pem").write_bytes(stale.public_bytes(Encoding.PEM))
    server, _ = start(
        processes,
        "server",
        "--listen", f"{LOOPBACK}:0",
        "--cert", str(d / "server.pem"),
        "--key", str(d / "server.key"),
        "--ca", str(d / "ca.pem"),
        "--crl", str(d / "crl.pem"),
    )  # fmt: skip
    text = "".join(server.process.lines)  # logged before it says it listens
    assert re.search(
        r"ERROR gateway\.expiry: the CRL .*crl\.pem expired on .*every client is refused", text
    )
    assert re.search(
        r"WARNING gateway\.expiry: the CA certificate .*ca\.pem expires in 9 days", text
    )
    assert re.search(
        r"WARNING gateway\.expiry: this gateway's certificate .*server\.pem expires in 9 days", text
    )
    assert server.stop() == 0
