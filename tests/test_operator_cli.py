"""What operators meet first: one clear line instead of a traceback, the flags every
command has, configuration from the environment, and `status`. Through the real command
line (`main`) or the real process (`python -m gateway`)."""

from __future__ import annotations

import gc
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import COMMANDS, _overrides, build_parser, main
from gateway.commands import CommandParser
from gateway.config import Address, ConfigError, load
from gateway.logs import JSONFormatter
from gateway.protocol import OpRequestImport

from .pkitools import PKI
from .test_cli import Process

TIMEOUT = 60


def _tls(pki: PKI, role: str = "server") -> list[str]:
    cert, key = (
        (pki.server_cert, pki.server_key) if role == "server" else (pki.client_cert, pki.client_key)
    )
    return ["--cert", str(cert), "--key", str(key), "--ca", str(pki.ca_pem)]


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Gateway processes, killed at the end if a test left them running."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        if process.proc.stderr:
            process.proc.stderr.close()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------ errors, not tracebacks


def test_a_listen_port_in_use_is_one_line_and_status_3(pki: PKI, taken_port: int) -> None:
    result = _run("server", "--listen", f"127.0.0.1:{taken_port}", *_tls(pki))
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"usbip-gateway server: cannot listen on 127.0.0.1:{taken_port}: Address already in "
        "use (another process listens there)"
    ) in result.stderr.splitlines()


def test_a_metrics_port_in_use_is_one_line_and_status_3(
    pki: PKI, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["server", "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{taken_port}"]
    assert main([*argv, *_tls(pki)]) == 3
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in (
        capsys.readouterr().err
    )


def test_a_later_listen_address_in_use_closes_the_earlier_ones(
    pki: PKI, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    for role in ("server", "client"):
        argv = [role, "--listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{taken_port}"]
        if role == "client":
            argv += ["--server", "gw.example.org"]
        assert main([*argv, *_tls(pki, role)]) == 3
        assert f"cannot listen on 127.0.0.1:{taken_port}" in capsys.readouterr().err
    gc.collect()  # a listener left open would be reported (an error under pytest) here


def test_ctrl_c_ends_the_demo_with_0_and_removes_its_directory() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    banner = ""
    try:
        for line in demo.stdout:
            banner += line
            if "Stop with Ctrl-C" in line:
                break
        directory = Path(re.search(r"certificates\s+(\S+)", banner).group(1))  # type: ignore[union-attr]
        assert (directory / "ca.pem").exists()
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=TIMEOUT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, err
    assert "Traceback" not in err
    assert not directory.exists()


def test_the_demo_on_a_taken_port_is_one_line_and_status_3(
    taken_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--check", "--port", str(taken_port), "--dir", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"usbip-gateway demo: cannot listen on 127.0.0.1:{taken_port}" in err
    assert "try another --port" in err


def test_discover_ends_without_a_traceback() -> None:
    result = _run("discover", "--timeout", "0.3")
    assert "Traceback" not in result.stderr
    assert "KeyError" not in result.stderr
    # Nothing announces itself here: status 1 and the line that says so (0 if another
    # gateway on this network announced itself meanwhile).
    assert result.returncode in (0, 1), result.stderr
    if result.returncode == 1:
        assert "no server gateway answered" in result.stderr


def test_discover_on_an_address_not_this_hosts_is_one_line_and_status_3() -> None:
    result = _run("discover", "--timeout", "0.3", "--interface", "192.0.2.1")  # TEST-NET-1
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("usbip-gateway discover: cannot browse with mDNS: ")
    assert len(result.stderr.splitlines()) == 1


def test_an_upstream_that_is_its_own_listen_address_is_refused(
    pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default upstream is usbipd on 3241: listening there would proxy to itself.
    assert main(["server", "--listen", "0.0.0.0:3241", *_tls(pki)]) == 2
    err = capsys.readouterr().err
    assert "server.upstream: 127.0.0.1:3241 is this gateway's own listen address" in err
    assert "usbipd --tcp-port 3241" in err
    assert main(["server", "--listen", "[::1]:5000", "--upstream", "[::1]:5000", *_tls(pki)]) == 2
    assert "own listen address [::1]:5000" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["127.0.0.1", "localhost:3240"])
def test_a_client_whose_server_is_itself_is_refused(
    pki: PKI, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", "--server", server, *_tls(pki, "client")]) == 2
    assert "is this gateway's own listen address 127.0.0.1:3240" in capsys.readouterr().err


def test_the_usual_pair_is_the_default(pki: PKI) -> None:
    args = build_parser().parse_args(["server", *_tls(pki)])
    config = load("server", None, _overrides("server", args))
    assert config.listen == (Address("0.0.0.0", 3240),)
    assert config.upstream == Address("127.0.0.1", 3241)  # type: ignore[union-attr]


def test_policy_check_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "p.rules"
    rules.write_text(
        'allow id 0525\nallow client-cn "alice"\nblock foo\nallow name "open\n'
        "default reject\ndefault allow\n"
    )
    assert main(["policy", "check", str(rules)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{rules}:1:10: expected VID:PID after 'id', got '0525'",
        f"{rules}:3:7: unknown attribute 'foo'",
        f"{rules}:4:12: unterminated string",
        f"{rules}:6:1: a second 'default' (the first is on line 5)",
        f"{rules}: 4 errors",
    ]


# ------------------------------------------------------------------ the flags every command has


def _parsers(
    parser: CommandParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], CommandParser]]:
    yield path, parser
    if parser.commands is not None:
        for name, child in parser.commands.choices.items():  # type: ignore[union-attr]
            yield from _parsers(child, (*path, name))


def _all_parsers() -> list[tuple[tuple[str, ...], CommandParser]]:
    parser = build_parser()
    assert isinstance(parser, CommandParser)
    return list(_parsers(parser))


def test_every_command_has_version_and_log_options() -> None:
    found = _all_parsers()
    assert len(found) >= 15  # the commands and their subcommands
    for path, parser in found:
        flags = {flag for action in parser.options for flag in action.option_strings}
        assert {"--version", "--log-level", "--log-format"} <= flags, path


@pytest.mark.parametrize("path", [("server",), ("certs", "issue"), ("policy", "check"), ("sim",)])
def test_version_answers_at_any_depth(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "usbip-gateway 0.1.0"


def test_every_option_has_help_with_its_default() -> None:
    missing = []
    for path, parser in _all_parsers():
        for action in parser.options:
            text = action.help or ""
            if not text:
                missing.append(f"{' '.join(path)} {action.dest}: no help")
            needs_default = action.option_strings and action.nargs != 0 and not action.required
            if needs_default and "default" not in text.lower():
                missing.append(f"{' '.join(path)} {action.option_strings[0]}: no default in help")
    assert missing == []


def test_log_format_reaches_a_command(tmp_path: Path) -> None:
    rules = tmp_path / "p.rules"
    rules.write_text("allow\n")
    assert (
        main(["policy", "check", str(rules), "--log-level", "debug", "--log-format", "json"]) == 0
    )
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert isinstance(root.handlers[0].formatter, JSONFormatter)


def test_the_short_listing_is_the_full_one() -> None:
    # `usbip-gateway --help` builds no command: it must read the same as with all built.
    assert build_parser("").format_help() == build_parser().format_help()
    assert list(COMMANDS) == [
        "server", "client", "certs", "policy", "sim", "discover", "status", "demo"
    ]  # fmt: skip


HEAVY = ("trio", "ssl", "prometheus_client", "zstandard", "zeroconf", "cryptography", "h11")
PROBE = f"""
import sys
from gateway.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY", [m for m in {HEAVY!r} if m in sys.modules])
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status", "--help"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert "HEAVY []" in result.stdout, result.stdout[-300:]


def test_help_answers_fast() -> None:
    # CPU time of the child, best of 3: what the program costs, not what other
    # processes on a loaded machine take from it.
    spent = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [sys.executable, "-m", "gateway", "--help"],
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    print(f"usbip-gateway --help: {min(spent) * 1000:.0f} ms of CPU (best of 3)")
    assert min(spent) < 0.3


# ------------------------------------------------------------------ the environment


def _tls_toml(pki: PKI, tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:1"\n{extra}'
        f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca_pem}"\n'
    )
    return path


def test_the_environment_is_between_the_file_and_the_flags(pki: PKI, tmp_path: Path) -> None:
    toml = _tls_toml(pki, tmp_path)
    env = {"USBIP_GATEWAY_SERVER_LISTEN": "127.0.0.1:2,127.0.0.1:3"}
    flags = {"server.listen": ["127.0.0.1:4"]}
    assert load("server", toml, {}).listen == (Address("127.0.0.1", 1),)
    assert load("server", toml, {}, env).listen == (
        Address("127.0.0.1", 2),
        Address("127.0.0.1", 3),
    )
    assert load("server", toml, flags, env).listen == (Address("127.0.0.1", 4),)


def test_environment_values_are_read_by_their_kind(pki: PKI, tmp_path: Path) -> None:
    env = {
        "USBIP_GATEWAY_LIMITS_MAX_HANDSHAKES": "64",
        "USBIP_GATEWAY_SERVER_HANDSHAKE_TIMEOUT": "2.5",
        "USBIP_GATEWAY_TRANSPORT_MPTCP": "true",
        "USBIP_GATEWAY_POLICY_ALLOW_URI": '["spiffe://a/x", "spiffe://a/y"]',
        "USBIP_GATEWAY_LOG_FORMAT": "json",
    }
    config = load("server", _tls_toml(pki, tmp_path), {}, env)
    assert config.resources.max_handshakes == 64
    assert config.handshake_timeout == 2.5
    assert config.transport.mptcp is True
    assert config.policy.allow_uri == ("spiffe://a/x", "spiffe://a/y")  # type: ignore[union-attr]
    assert config.log.format == "json"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"USBIP_GATEWAY_TLS_CRET": "x"}, "USBIP_GATEWAY_TLS_CRET: unknown variable"),
        (
            {"USBIP_GATEWAY_LIMITS_MAX_HANDSHAKES": "many"},
            "USBIP_GATEWAY_LIMITS_MAX_HANDSHAKES (limits.max_handshakes): must be a number",
        ),
        ({"USBIP_GATEWAY_TRANSPORT_MPTCP": "sure"}, "must be true or false, not 'sure'"),
    ],
)
def test_a_bad_variable_is_named(
    pki: PKI, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load("server", _tls_toml(pki, tmp_path), {}, env)


def test_a_gateway_from_the_environment_alone(
    pki: PKI,
    processes: list[Process],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "USBIP_GATEWAY_SERVER_LISTEN": "127.0.0.1:0",
        "USBIP_GATEWAY_TLS_CERT": str(pki.server_cert),
        "USBIP_GATEWAY_TLS_KEY": str(pki.server_key),
        "USBIP_GATEWAY_TLS_CA": str(pki.ca_pem),
        "USBIP_GATEWAY_POLICY_ALLOW_CN": "test-client",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = Process("server")
    processes.append(server)
    assert server.wait_ready() > 0
    assert server.stop() == 0
    assert any(
        "policy from the --allow-* shorthands" in line and "test-client" in line
        for line in server.lines
    ), server.lines


# ------------------------------------------------------------------ status


OP_REP_IMPORT_OK_HEADER = bytes.fromhex("0111 0003 00000000")
METRICS = re.compile(r"metrics, health and status on http://(\S+)/")


def test_status_shows_the_sessions_of_a_running_gateway(
    pki: PKI,
    processes: list[Process],
) -> None:
    sim = Process("sim", "--listen", "127.0.0.1:0")
    processes.append(sim)
    sim_port = sim.wait_ready()
    server = Process(
        "server", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{sim_port}",
        "--metrics-listen", "127.0.0.1:0", *_tls(pki),
    )  # fmt: skip
    processes.append(server)
    server_port = server.wait_ready()
    metrics = next(m.group(1) for line in server.lines if (m := METRICS.search(line)))
    client = Process(
        "client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{server_port}",
        "--server-name", "localhost", *_tls(pki, "client"),
    )  # fmt: skip
    processes.append(client)
    client_port = client.wait_ready()
    # An imported device keeps its session open while we look.
    with socket.create_connection(("127.0.0.1", client_port), timeout=TIMEOUT) as attached:
        attached.sendall(OpRequestImport("1-2").encode())
        reply = b""
        while len(reply) < len(OP_REP_IMPORT_OK_HEADER):
            chunk = attached.recv(len(OP_REP_IMPORT_OK_HEADER) - len(reply))
            assert chunk, "closed before the IMPORT reply"
            reply += chunk
        assert reply == OP_REP_IMPORT_OK_HEADER  # the device record follows
        result = _run("status", "--metrics", metrics)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # (", usbipd up" in between once a /readyz has looked)
    assert lines[0].startswith("server gateway 0.1.0, listening, ")
    assert lines[0].endswith(", 1 session")
    assert lines[1].split() == [
        "ID", "IDENTITY", "DEVICE", "BYTES", "IN", "BYTES", "OUT", "IN", "FLIGHT", "P50", "P99"
    ]  # fmt: skip
    row = lines[2].split()
    assert row[1:3] == ["CN=test-client", "1-2"]


def test_status_of_an_unreachable_gateway_is_one_line(
    capsys: pytest.CaptureFixture[str], taken_port: int
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert main(["status", "--metrics", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"usbip-gateway status: cannot reach http://127.0.0.1:{port}/status")
    # Something that is not a gateway's endpoint answers: said as such.
    assert main(["status", "--metrics", f"127.0.0.1:{taken_port}", "--timeout", "0.5"]) != 0
