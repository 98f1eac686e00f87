"""One memory budget for the partial frames of all sessions: past it, the session whose
data would exceed it is closed with a clear error; the others carry on."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import trio
import trio.testing

from gateway.accounting.outcome import OutcomeKind
from gateway.accounting.session import Session
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    Direction,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Role,
    Splice,
)
from gateway.relay.budget import BufferBudget
from gateway.relay.pumps import relay

from ..observability.helpers import sample
from ..protocol.helpers import device, enumeration_steps
from .test_thread_pumps import socket_streams

INFO = device()
MiB = 1024 * 1024


@dataclass
class Relayed:
    client: trio.abc.Stream
    server: trio.abc.Stream
    server_conn: Connection
    session: Session
    done: trio.Event


async def _relayed(nursery: trio.Nursery, budget: BufferBudget) -> Relayed:
    """A session through `relay` over socket pairs, its device imported."""
    client, relay_client = await socket_streams()
    relay_server, server = await socket_streams()
    session = Session("server", "test", "memory", time.time())
    done = trio.Event()

    async def run() -> None:
        await relay(Splice(), relay_client, relay_server, session, budget=budget)
        done.set()

    nursery.start_soon(run)
    conn = Connection(Role.SERVER)
    await client.send_all(OpRequestImport(INFO.busid).encode())
    conn.receive_data(await server.receive_some(1 << 16))
    assert conn.next_event() == OpRequestImport(INFO.busid)
    await server.send_all(conn.send(OpReplyImport(OpStatus.OK, INFO)))
    assert await client.receive_some(1 << 16)  # the reply went through: URB phase
    for sender, event in enumeration_steps(INFO.devid):  # the relay learns the endpoints
        if sender is Role.CLIENT:
            await client.send_all(event.encode())
            conn.receive_data(await server.receive_some(1 << 16))
            assert conn.next_event() == event
        else:
            await server.send_all(conn.send(event))
            assert await client.receive_some(1 << 16) == event.encode()
    return Relayed(client, server, conn, session, done)


async def _until(condition: Callable[[], bool]) -> None:
    """Until the relay threads have made `condition` true (they signal nothing to Trio)."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)


def _big_urb(seqnum: int, size: int) -> bytes:
    return CmdSubmit(seqnum, INFO.devid, Direction.OUT, 1, size, data=bytes(size)).encode()


async def test_many_sessions_share_the_budget_and_the_one_past_it_is_closed(
    nursery: trio.Nursery,
) -> None:
    budget = BufferBudget(4 * MiB)
    metrics = GatewayMetrics("server")
    metrics.track_buffers(budget)
    sessions = [await _relayed(nursery, budget) for _ in range(5)]
    frame = _big_urb(1, MiB)
    part = 900 * 1024
    # Four sessions each hold most of a 1 MiB frame: 3.6 MiB, within the budget.
    for s in sessions[:4]:
        await s.client.send_all(frame[:part])
    await _until(lambda: budget.total == 4 * part)  # the relay threads have read it all
    assert sample(metrics, "usbip_gateway_buffered_bytes", role="server") == 4 * part
    # The fifth would take it past 4 MiB: that session is closed, with a clear error.
    last = sessions[4]
    with suppress(trio.BrokenResourceError):  # the relay may close while this is sent
        await last.client.send_all(frame[:part])
    with trio.fail_after(5):
        await last.done.wait()
    assert last.session.outcome.detail.startswith("over memory budget: the client sent")
    assert "limits.max_buffered_bytes (4194304)" in last.session.outcome.detail
    assert last.session.outcome.kind is OutcomeKind.RESOURCE_LIMIT
    assert not last.session.ended_normally  # logged as a warning at the session's end
    # Closed (reset, if the relay left bytes of the refused frame unread).
    with suppress(trio.BrokenResourceError):
        assert await last.client.receive_some(10) == b""
    assert budget.total == 4 * part  # what it held is given back
    # The others finish their frames: forwarded whole, and their part is freed.
    for s in sessions[:4]:
        await s.client.send_all(frame[part:])
        data = b""
        while len(data) < len(frame):
            data += await s.server.receive_some(len(frame))
        assert data == frame
        assert not s.done.is_set()
    assert budget.total == 0
    for s in sessions[:4]:
        await s.client.aclose()
        await s.done.wait()
    assert budget.total == 0
    for s in sessions:
        await s.client.aclose()
        await s.server.aclose()


async def test_a_frame_over_the_budget_ends_its_session(nursery: trio.Nursery) -> None:
    budget = BufferBudget(1 * MiB)
    s = await _relayed(nursery, budget)
    frame = _big_urb(1, 2 * MiB)
    with trio.fail_after(10):
        # The relay may close while this is still being sent.
        with suppress(trio.BrokenResourceError):
            await s.client.send_all(frame[: len(frame) * 3 // 4])
        await s.done.wait()
    assert s.session.outcome.kind is OutcomeKind.RESOURCE_LIMIT
    assert s.session.outcome.detail.startswith("over memory budget: the client sent")
    assert budget.total == 0
    # Nothing of the refused frame reached the server side.
    assert s.server_conn.next_event() is NEED_DATA
    assert await s.server.receive_some(1 << 16) == b""
    await s.client.aclose()
    await s.server.aclose()
