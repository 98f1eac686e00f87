"""`DirectSocketStream` (the relay's socket driver) keeps the trio Stream contract."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from gateway.transport import direct
from gateway.transport.direct import DirectSocketStream, direct_io


async def _pair() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    a, b = socket.socketpair()
    left, right = (trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in (a, b))
    wrapped = direct_io(left), direct_io(right)
    assert all(isinstance(s, DirectSocketStream) for s in wrapped)
    return wrapped  # type: ignore[return-value]


async def test_direct_socket_stream_is_a_half_closeable_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # trio's checker wants a schedule point in every call; the stream gives one every
    # YIELD_EVERY calls by design, so it is checked with one every call.
    monkeypatch.setattr(direct, "YIELD_EVERY", 1)
    await trio.testing.check_half_closeable_stream(_pair, None)


async def test_a_busy_stream_still_lets_other_tasks_run() -> None:
    left, right = await _pair()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for _ in range(100):
            await left.send_all(b"x")
            await right.receive_some(1)
        nursery.cancel_scope.cancel()
    await left.aclose()
    await right.aclose()
    assert ticks >= 10  # the other task ran while this one never had to wait long
