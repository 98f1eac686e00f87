"""Receive buffers are borrowed from a shared pool only while bytes are read.

An idle session's thread waits in `poll` holding none: with hundreds of attached but
quiet devices, the memory is what is being read, not what might be.
"""

from __future__ import annotations

import socket

import pytest

from gateway.transport import socket_ends
from gateway.transport.socket_ends import READ, SocketEnd


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts buffers taken from the pool (an empty one, so each take is an allocation)."""
    counter = [0]
    take = socket_ends._take_buffer
    monkeypatch.setattr(socket_ends, "_BUFFERS", [])

    def counting() -> memoryview:
        counter[0] += 1
        return take()

    monkeypatch.setattr(socket_ends, "_take_buffer", counting)
    return counter


def test_a_read_borrows_a_buffer_and_returns_its_own_bytes(taken: list[int]) -> None:
    pairs = [socket.socketpair() for _ in range(20)]
    ends = []
    for _, theirs in pairs:
        theirs.setblocking(False)
        ends.append(SocketEnd(theirs))
    # Nothing to read: the call says what to wait for, and the buffer is back in the pool.
    assert ends[1].read() == (None, READ)
    assert len(socket_ends._BUFFERS) == 1
    pairs[0][0].sendall(b"x" * 1000)
    data, wait = ends[0].read()
    assert (data, wait) == (b"x" * 1000, READ)  # all the kernel had: poll before the next
    assert isinstance(data, bytes)  # its own, not a view of the pooled buffer
    assert taken[0] == 2  # each read borrowed one...
    assert len(socket_ends._BUFFERS) == 1  # ...the same one: both gave it back
    for end in ends:
        end.finish()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_the_pool_keeps_a_bounded_number_of_spares(taken: list[int]) -> None:
    views = [socket_ends._take_buffer() for _ in range(socket_ends._POOLED_BUFFERS + 5)]
    a, b = socket.socketpair()
    b.setblocking(False)
    end = SocketEnd(b)
    socket_ends._BUFFERS.extend(views[: socket_ends._POOLED_BUFFERS])
    a.sendall(b"y")
    assert end.read() == (b"y", READ)
    assert len(socket_ends._BUFFERS) == socket_ends._POOLED_BUFFERS
    end.finish()
    a.close()
    b.close()
