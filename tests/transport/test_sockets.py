"""Socket options on connected and accepted sockets, read back from the kernel."""

from __future__ import annotations

import logging
import socket
from typing import TypedDict, Unpack

import pytest
import trio
import trio.testing

from gateway.transport import sockets
from gateway.transport.sockets import IPPROTO_MPTCP, open_tcp, open_tcp_listeners


class Keepalive(TypedDict, total=False):
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int


KEEPALIVE = Keepalive(keepalive_idle=61, keepalive_interval=11, keepalive_count=7)


def _options(sock: trio.socket.SocketType) -> dict[str, int]:
    got = {
        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    }
    for key, name in (
        ("idle", "TCP_KEEPIDLE"),
        ("interval", "TCP_KEEPINTVL"),
        ("count", "TCP_KEEPCNT"),
    ):
        if hasattr(socket, name):
            got[key] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
    return got


def _expected(idle: int, interval: int, count: int) -> dict[str, int]:
    want = {"nodelay": 1, "keepalive": 1, "idle": idle, "interval": interval, "count": count}
    names = {"idle": "TCP_KEEPIDLE", "interval": "TCP_KEEPINTVL", "count": "TCP_KEEPCNT"}
    return {k: v for k, v in want.items() if k not in names or hasattr(socket, names[k])}


def _mptcp_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError:
        return False
    return True


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _connect_pair(
    host: str, *, mptcp: bool = False, **keepalive: Unpack[Keepalive]
) -> tuple[trio.SocketStream, trio.SocketStream, list[sockets.TunedListener]]:
    listeners = await open_tcp_listeners(host, 0, mptcp=mptcp, **keepalive)
    port = listeners[0].socket.getsockname()[1]
    client = await open_tcp(host, port, connect_timeout=5, mptcp=mptcp, **keepalive)
    server = await listeners[0].accept()
    return client, server, listeners


async def _close(*resources: trio.abc.AsyncResource) -> None:
    for r in resources:
        await r.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_options_on_connected_and_accepted_sockets(host: str) -> None:
    if host == "::1" and not _ipv6_available():
        pytest.skip("no IPv6 loopback")
    client, server, listeners = await _connect_pair(host, **KEEPALIVE)
    want = _expected(61, 11, 7)
    assert _options(client.socket) == want
    assert _options(server.socket) == want
    assert _options(listeners[0].socket) == want
    await client.send_all(b"x")
    assert await server.receive_some() == b"x"
    await _close(client, server, *listeners)


async def test_default_keepalive_is_60_10_6() -> None:
    client, server, listeners = await _connect_pair("127.0.0.1")
    assert _options(client.socket) == _expected(60, 10, 6)
    assert _options(server.socket) == _expected(60, 10, 6)
    await _close(client, server, *listeners)


async def test_listener_sets_options_on_accepted_sockets_itself() -> None:
    # Undo the listening socket's options so only the wrapper can have set them.
    listeners = await open_tcp_listeners("127.0.0.1", 0, **KEEPALIVE)
    ls = listeners[0].socket
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 999)
    client = await open_tcp("127.0.0.1", ls.getsockname()[1], connect_timeout=5)
    server = await listeners[0].accept()
    assert _options(server.socket) == _expected(61, 11, 7)
    await _close(client, server, *listeners)


async def test_listen_on_all_interfaces_binds_each_family_separately() -> None:
    listeners = await open_tcp_listeners(None, 0)
    families = {listener.socket.family for listener in listeners}
    assert socket.AF_INET in families
    for listener in listeners:
        if listener.socket.family == socket.AF_INET6:
            assert listener.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    await _close(*listeners)


async def test_connection_refused_is_oserror() -> None:
    listeners = await open_tcp_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    await _close(*listeners)
    with pytest.raises(ConnectionRefusedError):
        await open_tcp("127.0.0.1", port, connect_timeout=5)


class _BlackholeSocket(trio.socket.SocketType):
    """A socket whose connect never completes, like a SYN dropped by a firewall."""

    def __init__(self, family: int, proto: int) -> None:
        self._family, self._proto, self.closed = family, proto, False

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AddressFamily(self._family)

    @property
    def type(self) -> socket.SocketKind:
        return socket.SOCK_STREAM

    @property
    def proto(self) -> int:
        return self._proto

    def setsockopt(self, *args: object) -> None:
        pass

    async def connect(self, address: object) -> None:
        await trio.sleep_forever()

    def close(self) -> None:
        self.closed = True


class _BlackholeFactory(trio.abc.SocketFactory):
    def __init__(self) -> None:
        self.made: list[_BlackholeSocket] = []

    def socket(
        self, family: int | None = None, type: int | None = None, proto: int | None = None
    ) -> trio.socket.SocketType:
        sock = _BlackholeSocket(family or socket.AF_INET, proto or 0)
        self.made.append(sock)
        return sock


async def test_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    factory = _BlackholeFactory()
    trio.socket.set_custom_socket_factory(factory)
    start = trio.current_time()
    with pytest.raises(TimeoutError, match=r"127\.0\.0\.1:9 timed out after 7s"):
        await open_tcp("127.0.0.1", 9, connect_timeout=7)
    assert trio.current_time() - start == pytest.approx(7)
    assert [s.closed for s in factory.made] == [True]


async def test_mptcp_falls_back_to_tcp_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An unassigned protocol number makes socket() fail the way a kernel without MPTCP does.
    monkeypatch.setattr(sockets, "IPPROTO_MPTCP", 253)
    caplog.set_level(logging.DEBUG, logger="gateway.transport")
    client, server, listeners = await _connect_pair("127.0.0.1", mptcp=True, **KEEPALIVE)
    assert client.socket.proto in (0, socket.IPPROTO_TCP)
    assert _options(client.socket) == _expected(61, 11, 7)
    fallbacks = [r for r in caplog.records if "falling back to TCP" in r.getMessage()]
    assert len(fallbacks) == 2  # one per socket created: the listener and the client
    assert all(r.name == "gateway.transport" for r in fallbacks)
    await _close(client, server, *listeners)


@pytest.mark.skipif(not _mptcp_available(), reason="kernel without MPTCP")
async def test_mptcp_sockets_when_available() -> None:
    client, server, listeners = await _connect_pair("127.0.0.1", mptcp=True, **KEEPALIVE)
    assert client.socket.proto == IPPROTO_MPTCP
    assert listeners[0].socket.proto == IPPROTO_MPTCP
    assert _options(client.socket)["nodelay"] == 1
    assert _options(server.socket)["keepalive"] == 1
    await client.send_all(b"mp")
    assert await server.receive_some() == b"mp"
    await _close(client, server, *listeners)
