"""A failed link between the gateways reaches the `usbip` user as a failure, with the
cause and a hint in the client gateway's log (the real tool, as users run it)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.config import Address
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import OpReplyDevlist, OpRequestDevlist, OpStatus
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address

from ..pkitools import PKI, client_config, make_pki, server_config

pytestmark = pytest.mark.tools


def _usbip() -> str:
    path = shutil.which("usbip") or shutil.which("usbip", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail("Debian's usbip tool is missing: apt-get install usbip (.ci/run does)")
    return path


async def _server(pki: PKI, nursery: trio.Nursery) -> Address:
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    server = ServerGateway(server_config(pki, Address(*sim.addresses[0])), strings=sim)
    return local_address((await nursery.start(server.serve))[0])


async def _client(nursery: trio.Nursery, gateway: ClientGateway) -> Address:
    return local_address((await nursery.start(gateway.serve))[0])


async def _usbip_list(port: int) -> tuple[int, str]:
    result = await trio.run_process(
        [_usbip(), "--tcp-port", str(port), "list", "-r", "127.0.0.1"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


def _session_ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.edges.client_gateway" and "session end" in r.getMessage()
    ]


async def test_a_name_mismatch_is_a_failure_with_a_hint(
    pki: PKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway")
    server = await _server(pki, nursery)
    client = ClientGateway(replace(client_config(pki, server), server_name="gw.example.org"))
    status, output = await _usbip_list((await _client(nursery, client)).port)
    # Before: the tool printed "Request Completed Successfully" and exited 1 anyway.
    assert "Request Completed Successfully" not in output
    assert "Exported Device List Request failed - Unexpected response" in output, output
    assert status != 0
    await client.acceptor.wait_idle()
    (end,) = _session_ends(caplog)
    assert "hostname_mismatch" in end
    assert "--server-name" in end
    assert "gw.example.org" in end


async def test_a_client_certificate_the_server_refuses_is_a_failure(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # With TLS 1.3 the client's handshake is done before the server has judged its
    # certificate: the refusal arrives on the first read, after the request went out.
    caplog.set_level(logging.INFO, "gateway")
    server = await _server(pki, nursery)
    stranger = make_pki(tmp_path / "other")  # a client certificate from another CA
    tls = replace(stranger.client_tls(), ca=pki.ca_pem)
    client = ClientGateway(replace(client_config(pki, server), tls=tls))
    status, output = await _usbip_list((await _client(nursery, client)).port)
    assert "Request Completed Successfully" not in output
    assert "Exported Device List Request failed - Unexpected response" in output, output
    assert status != 0
    await client.acceptor.wait_idle()
    (end,) = _session_ends(caplog)
    assert "the server gateway refused this gateway: unknown_ca" in end
    assert "tls.ca" in end
    failures = client.metrics.registry.get_sample_value(
        "usbip_gateway_tls_handshake_failures_total", {"role": "client", "reason": "unknown_ca"}
    )
    assert failures == 1


async def test_an_unreachable_server_gateway_is_a_failed_reply(
    pki: PKI, nursery: trio.Nursery
) -> None:
    closed = trio.socket.socket()  # a port nothing listens on
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    client = ClientGateway(client_config(pki, Address("127.0.0.1", port)))
    local = await _client(nursery, client)
    stream = await trio.open_tcp_stream(local.host, local.port)
    with trio.fail_after(10):
        await stream.send_all(OpRequestDevlist().encode())
        assert await stream.receive_some(64) == OpReplyDevlist(status=OpStatus.ERROR).encode()
    await stream.aclose()
