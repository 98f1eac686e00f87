"""RLIMIT_NOFILE: raised to the hard limit at start; max_connections lowered to what fits."""

from __future__ import annotations

import resource

import pytest

from gateway.edges.fd_limit import FDS_PER_SESSION, RESERVED_FDS, FdLimitError, needed_fds, plan

from ..pkitools import PKI
from ..test_cli import Process, processes  # noqa: F401 - the fixture

INF = resource.RLIM_INFINITY


def test_the_soft_limit_is_raised_to_the_hard_one_when_that_fits() -> None:
    result = plan(1024, 65536, max_connections=1024, max_handshakes=128)
    assert result.soft == 65536
    assert result.max_connections == 1024
    assert result.needed == RESERVED_FDS + 128 + FDS_PER_SESSION * 1024


def test_max_connections_is_lowered_to_what_the_hard_limit_fits() -> None:
    result = plan(256, 1024, max_connections=1024, max_handshakes=128)
    assert result.soft == 1024
    assert result.max_connections == (1024 - RESERVED_FDS - 128) // FDS_PER_SESSION
    assert needed_fds(result.max_connections, 128) <= 1024


def test_unlimited_limits() -> None:
    assert plan(INF, INF, max_connections=5000, max_handshakes=10).max_connections == 5000
    # An unlimited hard limit: the soft one is raised to what is needed, no further.
    result = plan(1024, INF, max_connections=5000, max_handshakes=10)
    assert (result.soft, result.max_connections) == (needed_fds(5000, 10), 5000)
    assert plan(99999, INF, max_connections=10, max_handshakes=10).soft == 99999


def test_no_room_for_one_session_refuses_to_start() -> None:
    with pytest.raises(FdLimitError, match="LimitNOFILE"):
        plan(100, 100, max_connections=10, max_handshakes=64)


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))


def _server_args(pki: PKI, *extra: str) -> tuple[str, ...]:
    return (
        "server",
        "--listen", "127.0.0.1:0",
        "--upstream", "127.0.0.1:9",
        "--cert", str(pki.server_cert),
        "--key", str(pki.server_key),
        "--ca", str(pki.ca_pem),
        *extra,
    )  # fmt: skip


def test_the_real_process_raises_its_limit_and_caps_max_connections(
    pki: PKI,
    processes: list[Process],  # noqa: F811
) -> None:
    process = Process(*_server_args(pki), preexec_fn=_low_limit)
    processes.append(process)
    process.wait_ready()
    with open(f"/proc/{process.proc.pid}/limits") as limits:
        line = next(x for x in limits if x.startswith("Max open files"))
    assert line.split()[3:5] == ["256", "256"]  # soft raised to the hard limit
    fits = (256 - RESERVED_FDS - 128) // FDS_PER_SESSION
    capped = [x for x in process.lines if "max_connections lowered" in x]
    assert len(capped) == 1
    assert f"from 1024 to {fits}" in capped[0]
    assert process.stop() == 0


def test_the_real_process_refuses_to_start_without_room_for_a_session(
    pki: PKI,
    processes: list[Process],  # noqa: F811
) -> None:
    process = Process(
        *_server_args(pki),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (150, 150)),
    )
    processes.append(process)
    assert process.proc.wait(timeout=30) == 2
    assert process.proc.stderr is not None
    assert "LimitNOFILE" in process.proc.stderr.read()
