"""`TlsStream` keeps the `trio.abc.Stream` contract, over real TLS on socket pairs."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from gateway.transport.tls_stream import TlsStream


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gateway.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def _pair() -> tuple[TlsStream, TlsStream]:
    a, b = socket.socketpair()
    server_ctx, client_ctx = _contexts()
    client = TlsStream(a, client_ctx, server_hostname="gateway.test")
    server = TlsStream(b, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_the_stream_contract() -> None:
    await trio.testing.check_two_way_stream(_pair, None)


async def test_the_handshake_happens_on_first_use() -> None:
    a, b = socket.socketpair()
    server_ctx, client_ctx = _contexts()
    client = TlsStream(a, client_ctx, server_hostname="gateway.test")
    server = TlsStream(b, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"first")
        assert await server.receive_some() == b"first"
    assert client.handshook
    assert server.handshook
    await client.aclose()
    await server.aclose()


async def test_close_notify_is_an_end_and_a_bare_eof_is_broken() -> None:
    client, server = await _pair()
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()
    client, server = await _pair()
    client.socket.close()  # no close_notify
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()
    await client.aclose()


async def test_a_send_cancelled_midway_leaves_the_stream_broken() -> None:
    """OpenSSL must be called again with the rest of a record it started; nobody will."""
    client, server = await _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, bytes(16 << 20))  # the peer never reads
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_aclose_forcefully_closes_the_socket() -> None:
    client, server = await _pair()
    await trio.aclose_forcefully(client)
    assert client.socket.fileno() == -1
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    await server.aclose()
