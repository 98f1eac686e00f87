"""Connection limit and draining, on the real gateway pair."""

from __future__ import annotations

import logging
from contextlib import suppress

import pytest
import trio

from gateway.demo import Stack, start_stack
from gateway.edges.acceptor import Acceptor, Slot
from gateway.protocol import Direction
from gateway.transport.sockets import open_tcp_listeners
from gateway.usbip.importer import import_device, list_devices

from ..pkitools import PKI


async def _stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def test_the_handshake_limit_refuses_at_once_and_others_keep_working(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    stack.server.acceptor.max_handshakes = 2
    address = stack.server_address
    # Two connections that never finish their TLS handshake hold both handshake places.
    holders = [await trio.open_tcp_stream(address.host, address.port) for _ in range(2)]
    await trio.testing.wait_all_tasks_blocked()
    assert stack.server.acceptor.active == 2
    extra = await trio.open_tcp_stream(address.host, address.port)
    # Answered at once, not after the handshake timeout; a reset is just as final.
    with trio.fail_after(5), suppress(trio.BrokenResourceError):
        assert await extra.receive_some(10) == b""
    await extra.aclose()
    assert stack.server.acceptor.refused == 1
    assert b"usbip_gateway_connections_refused_total" in stack.server.metrics.exposition()
    # A place frees up: the next client is served normally.
    await holders[0].aclose()
    await trio.testing.wait_all_tasks_blocked()
    devices = await list_devices(
        await trio.open_tcp_stream(stack.client_address.host, stack.client_address.port)
    )
    assert len(devices) == 3
    await holders[1].aclose()


async def test_drain_stops_accepting_and_waits_for_open_sessions(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    result: list[bool] = []

    async def drain() -> None:
        result.append(await stack.server.shutdown(timeout=60))

    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        inner.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        # New connections are no longer accepted by the server gateway...
        try:
            refused = await trio.open_tcp_stream(
                stack.server_address.host, stack.server_address.port
            )
        except OSError:
            pass
        else:
            await refused.aclose()
            raise AssertionError("the server gateway still accepts while draining")
        # ...while the open session still carries URBs.
        done = await device.submit(1, Direction.OUT, data=b"still here")
        assert done.status == 0
        assert result == []
        await device.aclose()
    assert result == [True]


async def test_drain_that_times_out_closes_the_remaining_sessions(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        assert await stack.server.shutdown(timeout=0.2) is False
        with trio.fail_after(10):
            await device.closed.wait()
        await device.aclose()


async def test_a_handler_bug_ends_only_its_own_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    served: list[bytes] = []

    async def handler(stream: trio.SocketStream, slot: Slot) -> None:
        assert slot.promote()
        data = await stream.receive_some(10)
        if data == b"boom":
            raise RuntimeError("a bug")
        served.append(data)
        await stream.send_all(b"ok")

    listeners = await open_tcp_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    acceptor = Acceptor("test", handler, max_connections=10)
    await nursery.start(acceptor.run, listeners)
    with caplog.at_level(logging.ERROR, "gateway.edges.acceptor"):
        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all(b"boom")
        assert await bad.receive_some(10) == b""  # closed, not hung
        await bad.aclose()
        await acceptor.wait_idle()
    assert acceptor.internal_errors == 1
    assert "internal error in a connection handler" in caplog.text
    good = await trio.open_tcp_stream("127.0.0.1", port)
    await good.send_all(b"hello")
    assert await good.receive_some(10) == b"ok"
    await good.aclose()
    assert served == [b"hello"]
