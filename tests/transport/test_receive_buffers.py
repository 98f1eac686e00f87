"""Receive buffers are borrowed from a shared pool only while bytes are read.

An idle session's threads wait in `poll` holding none: with hundreds of attached but
quiet devices, the memory is what is being read, not what might be.
"""

from __future__ import annotations

import socket
import threading

import pytest

from gateway.transport import blocking
from gateway.transport.blocking import SocketEnd, Wakeup


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts buffers taken from the pool (an empty one, so each take is an allocation)."""
    counter = [0]
    take = blocking._take_buffer
    monkeypatch.setattr(blocking, "_BUFFERS", [])

    def counting() -> memoryview:
        counter[0] += 1
        return take()

    monkeypatch.setattr(blocking, "_take_buffer", counting)
    return counter


def test_waiting_endpoints_hold_no_buffer_and_a_read_returns_its_own(taken: list[int]) -> None:
    pairs = [socket.socketpair() for _ in range(20)]
    wakeups = [Wakeup() for _ in pairs]  # one per session, as the relay has
    ends = []
    for (_, theirs), wakeup in zip(pairs, wakeups, strict=True):
        theirs.setblocking(False)
        end = SocketEnd(theirs)
        end.start(wakeup)
        ends.append(end)
    got: list[bytes] = []
    ready = threading.Barrier(len(ends) + 1)

    def read(end: SocketEnd) -> None:
        ready.wait()
        got.append(end.recv())

    threads = [threading.Thread(target=read, args=(end,)) for end in ends]
    for thread in threads:
        thread.start()
    ready.wait()
    # One endpoint gets data: it borrows a buffer, reads, and puts it back.
    pairs[0][0].sendall(b"x" * 1000)
    threads[0].join(timeout=10)
    assert got == [b"x" * 1000]
    assert taken[0] == 1
    assert len(blocking._BUFFERS) == 1
    # The others were only ever waiting: stopping them takes nothing either.
    for end in ends[1:]:
        end.stop_reading()
    for thread in threads[1:]:
        thread.join(timeout=10)
    assert got[1:] == [b""] * (len(ends) - 1)
    assert taken[0] == 1
    for end, wakeup in zip(ends, wakeups, strict=True):
        end.finish()
        wakeup.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_the_pool_keeps_a_bounded_number_of_spares(taken: list[int]) -> None:
    views = [blocking._take_buffer() for _ in range(blocking._POOLED_BUFFERS + 5)]
    a, b = socket.socketpair()
    b.setblocking(False)
    end = SocketEnd(b)
    wakeup = Wakeup()
    end.start(wakeup)
    blocking._BUFFERS.extend(views[: blocking._POOLED_BUFFERS])
    a.sendall(b"y")
    assert end.recv() == b"y"
    assert len(blocking._BUFFERS) == blocking._POOLED_BUFFERS
    end.finish()
    wakeup.close()
    a.close()
    b.close()
