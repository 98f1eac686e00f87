"""The relay's threads: real sockets, real TLS, the same checks and outcomes.

The peers are Trio streams over socket pairs; the relay between them pumps in OS threads
(`gateway.transport.blocking`). Frame and state logic is the Splice's, tested in
tests/protocol; here: that bytes, ends, errors and cancellation cross the threads right.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trustme

from gateway.accounting.outcome import Outcome, OutcomeKind
from gateway.accounting.session import Session
from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    ConnectionClosed,
    Direction,
    Event,
    Frame,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    Role,
    Splice,
)
from gateway.relay.pumps import CLOSE_TIMEOUT, relay
from gateway.transport.compression import MAX_CHUNK, ByteCounter, ChunkType, ZstdStream, wrap
from gateway.transport.reads import next_event
from gateway.transport.socket_ends import socket_end
from gateway.transport.tls_stream import TlsStream, take_socket

from ..protocol.helpers import device, enumeration_steps

INFO = device()
CLOSED_BY_CLIENT = Outcome(OutcomeKind.CLOSED, "closed by client")
ENUMERATION_URBS = 2  # GET_DESCRIPTOR(configuration), SET_CONFIGURATION


@dataclass
class Peer:
    """One end of the relayed connection, speaking through the codec."""

    stream: trio.abc.Stream
    conn: Connection

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) for e in events))

    async def receive(self) -> Event:
        return await next_event(self.stream, self.conn)


@dataclass
class Relayed:
    client: Peer
    server: Peer
    session: Session
    outcome: list[Outcome]
    scope: trio.CancelScope
    ended: trio.Event  # set once the relay returned


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gateway.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def tls_pair(
    client_side: trio.SocketStream, server_side: trio.SocketStream
) -> tuple[TlsStream, TlsStream]:
    """(client, server) TLS streams over two connected socket streams, handshake done."""
    server_ctx, client_ctx = tls_contexts()
    client = TlsStream.over(client_side, client_ctx, server_hostname="gateway.test")
    server = TlsStream.over(server_side, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


@asynccontextmanager
async def relayed(*, tls: bool = False, zstd: ByteCounter | None = None) -> AsyncIterator[Relayed]:
    """client peer <-> (TLS?) <-> relay <-> server peer, all on socket pairs."""
    client_side, relay_client = await socket_streams()
    relay_server, server_side = await socket_streams()
    client_stream: trio.abc.Stream = client_side
    relay_client_stream: trio.abc.Stream = relay_client
    if tls:
        client_stream, relay_client_stream = await tls_pair(client_side, relay_client)
    if zstd is not None:
        client_stream = wrap(client_stream)
        relay_client_stream = wrap(relay_client_stream, on_bytes=zstd)
    session = Session("server", "test", "socketpair", time.time())
    outcome: list[Outcome] = []
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        ended = trio.Event()

        async def run() -> None:
            with scope:
                outcome.append(await relay(Splice(), relay_client_stream, relay_server, session))
            ended.set()

        nursery.start_soon(run)
        try:
            yield Relayed(
                Peer(client_stream, Connection(Role.CLIENT)),
                Peer(server_side, Connection(Role.SERVER)),
                session,
                outcome,
                scope,
                ended,
            )
        finally:
            for stream in (client_stream, server_side):
                await trio.aclose_forcefully(stream)


async def import_device(r: Relayed) -> None:
    await r.client.send(OpRequestImport(INFO.busid))
    assert await r.server.receive() == OpRequestImport(INFO.busid)
    await r.server.send(OpReplyImport(OpStatus.OK, INFO))
    assert await r.client.receive() == OpReplyImport(OpStatus.OK, INFO)
    for sender, event in enumeration_steps(INFO.devid):  # the relay learns the endpoints
        source, sink = (r.client, r.server) if sender is Role.CLIENT else (r.server, r.client)
        await source.send(event)
        assert await sink.receive() == event


def enumeration_bytes(sender: Role) -> int:
    return sum(len(e.encode()) for s, e in enumeration_steps(INFO.devid) if s is sender)


def out_urb(seqnum: int, data: bytes) -> CmdSubmit:
    return CmdSubmit(seqnum, INFO.devid, Direction.OUT, 1, len(data), data=data)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_urbs_cross_the_threads_and_the_client_closing_ends_the_session(
    tls: bool,
) -> None:
    async with relayed(tls=tls) as r:
        await import_device(r)
        big = bytes(range(256)) * 1024  # 256 KiB: many TLS records, several reads
        cmds = [out_urb(seqnum, big) for seqnum in range(1, 9)]
        async with trio.open_nursery() as nursery:  # more than the sockets buffer
            nursery.start_soon(r.client.send, *cmds)
            for cmd in cmds:
                assert await r.server.receive() == cmd
        rets = [RetSubmit(c.seqnum, actual_length=len(big)) for c in cmds]
        await r.server.send(*rets)
        for ret in rets:
            assert await r.client.receive() == ret
        await r.client.stream.aclose()
        assert await r.server.receive() == ConnectionClosed()
    assert r.outcome == [CLOSED_BY_CLIENT]
    assert r.session.outcome == CLOSED_BY_CLIENT
    assert r.session.urbs_completed == ENUMERATION_URBS + 8
    assert r.session.bytes_from_client == 40 + enumeration_bytes(Role.CLIENT) + 8 * (48 + len(big))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_one_thread_moves_both_directions_at_once(tls: bool) -> None:
    """2 MiB each way at the same time, far more than the sockets buffer: the relay's
    one thread must serve a side while the other is blocked writing, or both stall."""
    threads: set[int] = set()
    observe = Session.observe

    def spy(session: Session, sender: Role, frame: Frame, now: float) -> None:
        threads.add(threading.get_ident())
        observe(session, sender, frame, now)

    big = bytes(range(256)) * 1024  # 256 KiB
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Session, "observe", spy)
        async with relayed(tls=tls) as r:
            await import_device(r)
            ins = [CmdSubmit(100 + n, INFO.devid, Direction.IN, 2, len(big)) for n in range(8)]
            await r.client.send(*ins)
            for cmd in ins:
                assert await r.server.receive() == cmd
            outs = [out_urb(n, big) for n in range(1, 9)]
            rets = [RetSubmit(cmd.seqnum, actual_length=len(big), data=big) for cmd in ins]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(r.client.send, *outs)
                nursery.start_soon(r.server.send, *rets)
                for cmd in outs:
                    assert await r.server.receive() == cmd
                for ret in rets:
                    assert await r.client.receive() == ret
            await r.client.stream.aclose()
            assert await r.server.receive() == ConnectionClosed()
    assert r.outcome == [CLOSED_BY_CLIENT]
    assert r.session.bytes_from_server > 8 * len(big)
    assert len(threads) == 1  # every frame of both directions, on one thread


async def test_what_waits_for_a_peer_that_does_not_read_goes_within_the_close_timeout() -> None:
    """The client sends a 4 MiB frame the server does not read; then the server ends its
    side. The session is over (closed by the server) and what waits for the server gets
    CLOSE_TIMEOUT to go out: the relay returns then, not never, and not at once."""
    async with relayed() as r:
        await import_device(r)
        chunk = out_urb(1, bytes(4 << 20))
        with trio.move_on_after(5):  # a bound: the relay takes the whole frame first
            await r.client.send(chunk)
        assert isinstance(r.server.stream, trio.SocketStream)
        await r.server.stream.send_eof()
        started = trio.current_time()
        with trio.fail_after(CLOSE_TIMEOUT + 5):
            await r.ended.wait()
        waited = trio.current_time() - started
        received = 0
        with trio.fail_after(10):
            while data := await r.server.stream.receive_some(1 << 20):
                received += len(data)
    assert r.outcome == [Outcome(OutcomeKind.CLOSED, "closed by server")]
    assert CLOSE_TIMEOUT * 0.9 <= waited <= CLOSE_TIMEOUT + 5
    assert 0 < received < len(chunk.encode())


async def test_zstd_over_tls_crosses_the_threads_too() -> None:
    counted: dict[str, list[int]] = {"compress": [0, 0], "decompress": [0, 0]}

    def count(operation: str, before: int, after: int) -> None:
        counted[operation][0] += before
        counted[operation][1] += after

    async with relayed(tls=True, zstd=count) as r:
        await import_device(r)
        cmd = out_urb(1, bytes(200_000))  # compresses well
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.client.send, cmd)
            assert await r.server.receive() == cmd
        await r.server.send(RetSubmit(1, actual_length=200_000))
        assert await r.client.receive() == RetSubmit(1, actual_length=200_000)
        await r.client.stream.aclose()
        assert await r.server.receive() == ConnectionClosed()
    assert r.outcome == [CLOSED_BY_CLIENT]
    wire, plain = counted["decompress"]
    # the IMPORT request, the enumeration and the CMD_SUBMIT; their replies
    assert plain == 40 + enumeration_bytes(Role.CLIENT) + 48 + 200_000
    assert wire < plain / 10
    assert counted["compress"][0] == 320 + enumeration_bytes(Role.SERVER) + 48


async def test_a_burst_of_compressed_chunks_is_decoded_only_as_fast_as_it_is_forwarded() -> None:
    """One small TLS write carrying four 16 MiB URBs of zeros in 1024 zstd chunks.

    The relay forwards whole frames, so it may hold one frame; beyond that, it decodes a
    chunk only once it has forwarded what came before. What it has decoded and the
    server has not yet read stays within one frame, one chunk and the socket's buffer,
    however much the write unpacks to."""
    decoded = 0

    def count(operation: str, wire: int, plain: int) -> None:
        nonlocal decoded
        if operation == "decompress":
            decoded += plain

    size, urbs = 16 << 20, 4
    async with relayed(tls=True, zstd=count) as r:
        await import_device(r)
        assert isinstance(r.client.stream, ZstdStream)
        encoder, _, _, _ = r.client.stream.take_codec()  # to go on with its zstd stream
        cmds = [out_urb(n, bytes(size)) for n in range(1, urbs + 1)]
        wire = b"".join(encoder.encode(r.client.conn.send(cmd)) for cmd in cmds)
        assert len(wire) < 32 * 1024
        before = decoded
        await r.client.stream.transport.send_all(wire)
        received, ahead, events = 0, 0, []
        while len(events) < urbs:
            data = await r.server.stream.receive_some(1 << 16)
            assert data
            received += len(data)
            ahead = max(ahead, decoded - before - received)
            r.server.conn.receive_data(data)
            while (event := r.server.conn.next_event()) is not NEED_DATA:
                events.append(event)
        assert events == cmds
        # Decoding every chunk of a read at once would put all 64 MiB ahead.
        assert ahead < size + MAX_CHUNK, ahead
        # The session goes on.
        await r.server.send(RetSubmit(1, actual_length=size))
        assert await r.client.receive() == RetSubmit(1, actual_length=size)
        await r.client.stream.aclose()
        assert await r.server.receive() == ConnectionClosed()
    assert r.outcome == [CLOSED_BY_CLIENT]


async def test_a_compressed_chunk_over_the_limit_ends_the_session_cleanly() -> None:
    async with relayed(tls=True, zstd=lambda *_: None) as r:
        await import_device(r)
        assert isinstance(r.client.stream, ZstdStream)
        over = struct.pack(">BII", ChunkType.ZSTD, 16, MAX_CHUNK + 1) + bytes(16)
        await r.client.stream.transport.send_all(over)
        assert await r.server.receive() == ConnectionClosed()  # nothing forwarded
    assert r.outcome == [
        Outcome(
            OutcomeKind.CONNECTION_LOST,
            "connection lost: zstd: ZSTD chunk plain length 1048577 exceeds the limit of 1048576",
        )
    ]


async def test_a_bad_frame_is_not_forwarded_and_names_the_sender() -> None:
    async with relayed(tls=True) as r:
        await import_device(r)
        await r.client.send(out_urb(5, b"abc"))
        assert await r.server.receive() == out_urb(5, b"abc")
        good = RetSubmit(5, actual_length=3)
        bad = RetSubmit(6, actual_length=0)  # never submitted
        await r.server.stream.send_all(good.encode() + bad.encode())
        assert await r.client.receive() == good
        assert await r.client.receive() == ConnectionClosed()
    assert r.outcome[0].kind is OutcomeKind.PROTOCOL_ERROR
    assert r.outcome[0].side is Role.SERVER
    assert r.outcome[0].detail.startswith("protocol error from server: RET_SUBMIT for seqnum 6")
    assert r.session.urbs_completed == ENUMERATION_URBS + 1


async def test_a_tls_peer_vanishing_without_close_notify_is_a_lost_connection() -> None:
    async with relayed(tls=True) as r:
        await import_device(r)
        assert isinstance(r.client.stream, TlsStream)
        # The connection ends under the TLS object: no close_notify.
        with socket.socket(fileno=os.dup(r.client.stream.socket.fileno())) as raw:
            raw.shutdown(socket.SHUT_RDWR)
        assert await r.server.receive() == ConnectionClosed()
    assert r.outcome == [
        Outcome(
            OutcomeKind.CONNECTION_LOST,
            "connection lost: the peer closed the connection without a TLS close_notify",
        )
    ]
    assert r.session.outcome == r.outcome[0]


async def test_cancelling_wakes_threads_even_when_a_peer_does_not_read() -> None:
    async with relayed() as r:
        await import_device(r)
        # The server never reads: the relay's thread blocks writing to it.
        chunk = out_urb(1, bytes(4 << 20))
        with trio.move_on_after(5):  # a bound, not synchronisation
            await r.client.send(chunk)
        await trio.testing.wait_all_tasks_blocked()
        r.scope.cancel()
        # The server then reads part of the frame at most, and the end of the stream.
        received = 0
        with trio.fail_after(10):
            while data := await r.server.stream.receive_some(1 << 20):
                received += len(data)
    assert r.outcome == []
    assert r.session.outcome == Outcome(OutcomeKind.CANCELLED, "cancelled (gateway stopping)")
    assert received < len(chunk.encode())


async def test_a_stream_without_a_socket_cannot_be_relayed() -> None:
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(TypeError, match="no socket to relay from under StapledStream"):
        socket_end(a)
    await a.aclose()
    await b.aclose()


async def test_taking_the_socket_leaves_the_trio_stream_without_one() -> None:
    left, right = await socket_streams()
    sock = take_socket(left)
    assert left.socket.fileno() == -1
    sock.sendall(b"x")
    assert await right.receive_some(1) == b"x"
    await left.aclose()  # closes nothing
    sock.sendall(b"y")
    assert await right.receive_some(1) == b"y"
    sock.close()
    assert await right.receive_some(1) == b""
    await right.aclose()
