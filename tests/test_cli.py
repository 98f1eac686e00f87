"""The real processes, started the way a user starts them: config files, flags, signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.protocol import OpStatus

from .pkitools import PKI

READY = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT = 30.0


class Process:
    """A `python -m gateway ...` child whose stderr we read until it says it listens."""

    def __init__(self, *args: str, preexec_fn: Callable[[], object] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            preexec_fn=preexec_fn,  # noqa: PLW1509 - only sets a resource limit
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []

    def wait_ready(self) -> int:
        """The port from the process's own `listening on` line (it may have asked for 0)."""
        stderr = self.proc.stderr
        assert stderr is not None
        ports: list[int] = []

        def read() -> None:
            # Line by line in a thread: select() on the pipe misses a line that an earlier
            # readline() already pulled into the reader's buffer.
            for line in stderr:
                self.lines.append(line)
                if match := READY.search(line):
                    ports.append(int(match.group(2)))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if ports:
            return ports[0]
        raise AssertionError("not listening in time:\n" + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=START_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            assert self.proc.stderr is not None
            self.lines.extend(self.proc.stderr)
        return code


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        if process.proc.stderr:
            process.proc.stderr.close()


def _start(processes: list[Process], *args: str) -> tuple[Process, int]:
    process = Process(*args)
    processes.append(process)
    return process, process.wait_ready()


def _start_client(processes: list[Process], pki: PKI, server_port: int) -> tuple[Process, int]:
    """A client gateway from flags alone, to the server gateway on `server_port`."""
    return _start(
        processes,
        "client",
        "--listen", "127.0.0.1:0",
        "--server", f"127.0.0.1:{server_port}",
        "--server-name", "localhost",
        "--cert", str(pki.client_cert),
        "--key", str(pki.client_key),
        "--ca", str(pki.ca_pem),
    )  # fmt: skip


def _usbip_list(port: int) -> str:
    usbip = "/usr/sbin/usbip"
    if not Path(usbip).exists():
        pytest.fail("Debian's usbip tool is missing: apt-get install usbip (.ci/run does)")
    result = subprocess.run(
        [usbip, "--tcp-port", str(port), "list", "-r", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    return result.stdout + result.stderr


def test_three_processes_from_config_and_flags(
    pki: PKI, tmp_path: Path, processes: list[Process]
) -> None:
    _, sim_port = _start(processes, "sim", "--listen", "127.0.0.1:0")
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:{sim_port}"\n'
        f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca_pem}"\n'
    )
    server, server_port = _start(processes, "server", "--config", str(server_toml))
    # The client entirely from flags.
    client, client_port = _start_client(processes, pki, server_port)
    listing = _usbip_list(client_port)
    assert '1-1: Netchip Technology, Inc. : Linux-USB "Gadget Zero" (0525:a4a0)' in listing

    # SIGHUP reloads the certificates and keeps serving.
    server.proc.send_signal(signal.SIGHUP)
    assert "1-2:" in _usbip_list(client_port)

    assert client.stop() == 0
    assert server.stop() == 0
    server_log = "".join(server.lines)
    assert "reloaded TLS certificates (generation 2)" in server_log
    # One log line per session, with the client's identity and the outcome.
    assert re.search(r"session end .*peer=CN=test-client .*request=devlist", server_log)
    assert 'outcome="listed 3 of 3 devices"' in server_log


def test_config_error_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "server.toml"
    bad.write_text('[tls]\ncert = "x"\n')
    assert main(["server", "--config", str(bad)]) == 2
    assert "configuration error: tls.cert: file not found" in capsys.readouterr().err


def test_a_missing_client_flag_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--cert", "a", "--key", "b", "--ca", "c"]) == 2
    assert "client.server: is required" in capsys.readouterr().err


def test_demo_check_runs_the_whole_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--check", "--port", "0", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "self-check passed" in result.stdout
    assert "identical" in result.stdout
    # The demo's keys are private to their owner.
    assert (tmp_path / "client.key").stat().st_mode & 0o777 == 0o600


def test_op_status_names_match_the_tools() -> None:
    # `usbip attach` prints these names; keep ours aligned with usbip_network.h.
    assert [s.name for s in OpStatus] == ["OK", "NA", "DEV_BUSY", "DEV_ERR", "NODEV", "ERROR"]


def test_a_broken_policy_stops_the_server_at_start(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "policy.rules"
    rules.write_text("allow id 0525\n")
    tls = ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca_pem)]
    code = main(["server", "--listen", "127.0.0.1:0", "--policy", str(rules), *tls])
    assert code == 2
    assert f"{rules}:1:10: expected VID:PID after 'id'" in capsys.readouterr().err


def test_policy_commands_are_wired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "policy.rules"
    rules.write_text('allow id 0525:a4a0 client-cn "alice"\n')
    assert main(["policy", "check", str(rules)]) == 0
    assert main(["policy", "explain", str(rules), "--client", "cn:alice", "--id", "0525:a4a0"]) == 0
    assert "decision: allow" in capsys.readouterr().out


def test_policy_on_serials_published_by_the_sim(
    pki: PKI, tmp_path: Path, processes: list[Process]
) -> None:
    sysfs = tmp_path / "sysfs"
    _, sim_port = _start(processes, "sim", "--listen", "127.0.0.1:0", "--sysfs", str(sysfs))
    rules = tmp_path / "policy.rules"
    rules.write_text('allow serial "SIM-LB-0001"\ndefault reject\n')
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:{sim_port}"\n'
        f'[policy]\nfile = "{rules}"\nsysfs = "{sysfs}"\n'
        f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca_pem}"\n'
    )
    _, server_port = _start(processes, "server", "--config", str(server_toml))
    _, client_port = _start_client(processes, pki, server_port)
    listing = _usbip_list(client_port)
    assert "1-2:" in listing  # the loopback device, serial SIM-LB-0001
    assert "1-1:" not in listing
    assert "1-3:" not in listing


def test_sigterm_exits_1_when_sessions_outlive_the_shutdown_timeout(
    pki: PKI, processes: list[Process]
) -> None:
    import socket  # noqa: PLC0415

    _, sim_port = _start(processes, "sim", "--listen", "127.0.0.1:0")
    tls = ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca_pem)]
    server, server_port = _start(
        processes, "server", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{sim_port}",
        "--shutdown-timeout", "1", *tls,
    )  # fmt: skip
    client, client_port = _start_client(processes, pki, server_port)
    with socket.create_connection(("127.0.0.1", client_port), timeout=START_TIMEOUT) as held:
        held.sendall(b"\x01\x11\x80\x03\x00\x00\x00\x00" + b"1-2".ljust(32, b"\0"))
        reply = held.recv(8)
        assert reply[:4] == b"\x01\x11\x00\x03"  # imported: the session stays open
        assert server.stop() == 1  # drained for 1 s, then cut: exit status 1
    assert client.stop() == 0
    assert "still open after 1s" in "".join(server.lines)


def test_sim_stops_on_sigterm_with_status_0(processes: list[Process]) -> None:
    # A container's PID 1 has no default action for SIGTERM: the simulator handles it.
    sim, _ = _start(processes, "sim", "--listen", "127.0.0.1:0")
    assert sim.stop() == 0
    assert any("SIGTERM received, stopping" in line for line in sim.lines)
