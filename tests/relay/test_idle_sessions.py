"""Idle sessions: closed in the op phase by default, when attached only if configured.

The relay's threads read Trio's virtual clock (a MockClock that moves only when a test
jumps it), so hours pass at once, and only where the test says: after the bytes it sent
have crossed the relay."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from gateway.accounting.outcome import OPEN, Outcome, OutcomeKind
from gateway.accounting.session import Session
from gateway.demo import Stack, start_stack
from gateway.edges.client_gateway import ClientGateway
from gateway.protocol import (
    CmdSubmit,
    Direction,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Role,
    Splice,
)
from gateway.relay.pumps import IdleTimeouts, relay

from ..observability.helpers import sample
from ..pkitools import PKI, client_config
from ..protocol.helpers import device, enumeration_steps
from .test_thread_pumps import socket_streams

INFO = device()
HOUR = 3600.0


@dataclass
class Relayed:
    client: trio.abc.Stream
    server: trio.abc.Stream
    session: Session
    ended_at: list[float]
    done: trio.Event

    async def ended(self) -> float:
        """When the relay returned (the client saw its end first)."""
        assert await self.client.receive_some(10) == b""
        await self.done.wait()
        return self.ended_at[0]

    async def close(self) -> None:
        await self.client.aclose()
        await self.server.aclose()


async def _relayed(
    nursery: trio.Nursery, clock: trio.testing.MockClock, idle: IdleTimeouts
) -> Relayed:
    client, relay_client = await socket_streams()
    relay_server, server = await socket_streams()
    session = Session("client", "test", "socketpair", time.time())
    ended_at: list[float] = []
    done = trio.Event()

    async def run() -> None:
        await relay(
            Splice(), relay_client, relay_server, session, idle=idle, clock=clock.current_time
        )
        ended_at.append(trio.current_time())
        done.set()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()  # the relay is running: time may pass
    return Relayed(client, server, session, ended_at, done)


async def _later(clock: trio.testing.MockClock, seconds: float) -> None:
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def _import(r: Relayed) -> None:
    await r.client.send_all(OpRequestImport(INFO.busid).encode())
    assert await r.server.receive_some(1 << 16)
    await r.server.send_all(OpReplyImport(OpStatus.OK, INFO).encode())
    assert await r.client.receive_some(1 << 16)
    for sender, event in enumeration_steps(INFO.devid):  # the relay learns the endpoints
        source, sink = (r.client, r.server) if sender is Role.CLIENT else (r.server, r.client)
        await source.send_all(event.encode())
        assert await sink.receive_some(1 << 16) == event.encode()


async def test_a_silent_session_is_closed_in_the_op_phase(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    start = trio.current_time()
    r = await _relayed(nursery, mock_clock, IdleTimeouts(op=30.0))
    await _later(mock_clock, 29.9)
    assert r.ended_at == []
    await _later(mock_clock, 0.1)
    assert await r.ended() == pytest.approx(start + 30.0)
    assert r.session.outcome == Outcome(
        OutcomeKind.TIMEOUT, "idle: no traffic for 30s in the op phase"
    )
    assert not r.session.ended_normally  # a warning at the session's end
    await r.close()


async def test_traffic_in_the_op_phase_restarts_the_timer(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    start = trio.current_time()
    r = await _relayed(nursery, mock_clock, IdleTimeouts(op=30.0))
    await _later(mock_clock, 20)  # the client thinks, then asks
    await r.client.send_all(OpRequestImport(INFO.busid).encode())
    assert await r.server.receive_some(1 << 16)  # usbipd never answers
    await _later(mock_clock, 10)
    assert r.ended_at == []  # 30 s after the start, 10 s after the request
    await _later(mock_clock, 20)
    assert await r.ended() == pytest.approx(start + 50.0)
    await r.close()


async def test_an_idle_attached_session_stays_open_by_default(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    r = await _relayed(nursery, mock_clock, IdleTimeouts(op=30.0))
    await _import(r)
    await _later(mock_clock, 24 * HOUR)
    assert r.ended_at == []
    assert r.session.outcome is OPEN
    # Still relaying.
    urb = CmdSubmit(1, INFO.devid, Direction.OUT, 1, 3, data=b"abc").encode()
    await r.client.send_all(urb)
    assert await r.server.receive_some(1 << 16) == urb
    await r.close()


async def test_an_attached_idle_timeout_closes_after_the_last_urb(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    r = await _relayed(nursery, mock_clock, IdleTimeouts(op=30.0, attached=600.0))
    await _import(r)
    await _later(mock_clock, 500)
    urb = CmdSubmit(1, INFO.devid, Direction.OUT, 1, 3, data=b"abc").encode()
    await r.client.send_all(urb)
    assert await r.server.receive_some(1 << 16) == urb
    last = trio.current_time()
    await _later(mock_clock, 599)
    assert r.ended_at == []
    await _later(mock_clock, 1)
    assert await r.ended() == pytest.approx(last + 600.0)
    assert r.session.outcome == Outcome(OutcomeKind.TIMEOUT, "idle: no traffic for 600s attached")
    await r.close()


async def _stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def test_the_client_gateway_closes_a_silent_local_connection(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Wired through the config, on real sockets (real time, a short timeout)."""
    stack = await _stack(pki, nursery)
    client = ClientGateway(client_config(pki, stack.server_address, op_idle_timeout=0.2))
    address = (await nursery.start(client.serve))[0].socket.getsockname()
    silent = await trio.open_tcp_stream(*address[:2])
    with trio.fail_after(10):
        assert await silent.receive_some(10) == b""
    await silent.aclose()
    await client.acceptor.wait_idle()
    assert (
        sample(client.metrics, "usbip_gateway_sessions_total", role="client", outcome="timeout")
        == 1
    )
