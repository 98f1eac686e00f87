"""Handshakes have a pool of their own: silent connections cannot lock clients out."""

from __future__ import annotations

import logging

import pytest
import trio

from gateway.config import Address
from gateway.demo import Stack, start_stack
from gateway.protocol import Direction
from gateway.usbip.importer import import_device, list_devices

from ..observability.helpers import sample
from ..pkitools import PKI

REFUSED = "usbip_gateway_connections_refused_total"


async def _silent(target: Address, source: str) -> trio.SocketStream:
    """A TCP connection from `source` (another loopback address) that never speaks TLS."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((target.host, target.port))
    return trio.SocketStream(sock)


async def _closed_at_once(stream: trio.SocketStream) -> bool:
    """The gateway closed it without waiting for a handshake (a reset is as final)."""
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(10)
        except trio.BrokenResourceError:
            data = b""
    await stream.aclose()
    return data == b""


async def _stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def test_silent_connections_from_one_source_do_not_lock_clients_out(
    pki: PKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await _stack(pki, nursery)
    acceptor = stack.server.acceptor
    acceptor.max_connections = 2
    acceptor.max_handshakes = 8
    acceptor.max_handshakes_per_source = 4
    with caplog.at_level(logging.WARNING, "gateway.edges.acceptor"):
        silent = [await _silent(stack.server_address, "127.0.0.2") for _ in range(4)]
        extra = [await _silent(stack.server_address, "127.0.0.2") for _ in range(2)]
        for stream in extra:
            assert await _closed_at_once(stream)
    # Accepted in order: the refusals came after the four places were taken.
    assert acceptor.active_handshakes("127.0.0.2") == 4
    assert acceptor.established == 0
    metrics = stack.server.metrics
    assert sample(metrics, REFUSED, role="server", limit="handshakes_per_source") == 2
    assert sample(metrics, REFUSED, role="server", limit="connections") == 0
    # Rate-limited: one line for the two refusals.
    lines = [r for r in caplog.records if "max_handshakes_per_source = 4" in r.getMessage()]
    assert len(lines) == 1
    assert "127.0.0.2" in lines[0].getMessage()
    # An authorised client (mutual TLS through the client gateway) is still served.
    client = stack.client_address
    with trio.fail_after(10):
        devices = await list_devices(await trio.open_tcp_stream(client.host, client.port))
    assert len(devices) == 3
    for stream in silent:
        await stream.aclose()


async def test_a_full_handshake_pool_refuses_at_once_and_leaves_sessions_alone(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    acceptor = stack.server.acceptor
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    acceptor.max_handshakes = 3
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        silent = [await _silent(stack.server_address, f"127.0.0.{n}") for n in (2, 3, 4)]
        assert await _closed_at_once(await _silent(stack.server_address, "127.0.0.5"))
        assert acceptor.handshaking == 3
        assert acceptor.established == 1
        assert sample(stack.server.metrics, REFUSED, role="server", limit="handshakes") == 1
        # The attached session carries URBs as before.
        done = await device.submit(1, Direction.OUT, data=b"still here")
        assert done.status == 0
        await device.aclose()
    for stream in silent:
        await stream.aclose()


async def test_the_session_limit_counts_established_sessions_only(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    acceptor = stack.server.acceptor
    acceptor.max_connections = 1
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        # The one session place is taken: new connections are closed before any handshake.
        assert await _closed_at_once(await _silent(stack.server_address, "127.0.0.2"))
        assert sample(stack.server.metrics, REFUSED, role="server", limit="connections") == 1
        await device.aclose()
    # Its end frees the place for the next client.
    await stack.server.wait_idle()
    assert acceptor.established == 0
    devices = await list_devices(await trio.open_tcp_stream(client.host, client.port))
    assert len(devices) == 3
