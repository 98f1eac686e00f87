"""What a peer's zstd chunks can make a receiver hold, in Trio and in the relay threads.

A peer can send many small chunks that each decode to a lot (zeros compress a thousand
to one) in one small TLS write. Each read must decode one chunk, leaving the rest
compressed; a chunk up to the 1 MiB limit must decode, one over it is refused.
"""

from __future__ import annotations

import select
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import zstandard

from gateway.transport.compression import (
    MAX_CHUNK,
    ChunkType,
    CompressionError,
    ZstdReceiveStream,
    ZstdStream,
    wrap,
)
from gateway.transport.socket_ends import AnySocketEnd, LinkBroken, ZstdSocketEnd, socket_end
from gateway.transport.tls_stream import TlsStream

from ..relay.test_thread_pumps import socket_streams, tls_pair

KIB = 1024
BURST = 200  # chunks in one write


def zstd_chunks(*payloads: bytes) -> bytes:
    """One ZSTD chunk per payload, each one zstd frame (as a sender makes them)."""
    packer = zstandard.ZstdCompressor()
    out = []
    for payload in payloads:
        data = packer.compress(payload)
        out.append(struct.pack(">BII", ChunkType.ZSTD, len(data), len(payload)) + data)
    return b"".join(out)


def zeros_burst(count: int, plain_size: int) -> bytes:
    """`count` chunks, each decoding to `plain_size` zeros."""
    return zstd_chunks(*[bytes(plain_size)] * count)


def test_a_burst_is_a_small_write() -> None:
    """The premise: 200 MiB of plain data fits in one TLS record (16 KiB)."""
    assert len(zeros_burst(BURST, MAX_CHUNK)) < 16 * KIB


# ----------------------------------------------------------------- Trio (the op phase)


@pytest.mark.parametrize("plain_size", [128 * KIB, MAX_CHUNK], ids=["128KiB", "1MiB"])
async def test_trio_stream_decodes_one_chunk_per_receive(plain_size: int) -> None:
    wire = zeros_burst(BURST, plain_size)
    a, b = trio.testing.memory_stream_pair()
    receiver = ZstdReceiveStream(b)
    await a.send_all(wire)
    for n in range(1, 4):
        got = await receiver.receive_some()
        assert got == bytes(plain_size)
        # The decoder's own accounting: one chunk decoded per call, the rest compressed.
        assert receiver.stats.zstd_chunks == n
        assert receiver.stats.plain_bytes == n * plain_size
        assert receiver.decoder.pending == len(wire) - receiver.stats.wire_bytes > 0


@pytest.mark.parametrize("plain_size", [128 * KIB + 1, 300_000, MAX_CHUNK])
async def test_trio_stream_decodes_a_chunk_up_to_the_limit(plain_size: int) -> None:
    """And the chunk after it: nothing of the big one was left inside the decoder."""
    big = bytes(range(256)) * (plain_size // 256) + bytes(plain_size % 256)
    a, b = trio.testing.memory_stream_pair()
    receiver = ZstdReceiveStream(b)
    await a.send_all(zstd_chunks(big, b"after"))
    assert await receiver.receive_some() == big
    assert await receiver.receive_some() == b"after"


async def test_trio_stream_refuses_a_chunk_over_the_limit() -> None:
    a, b = trio.testing.memory_stream_pair()
    receiver = ZstdReceiveStream(b)
    await a.send_all(zeros_burst(1, MAX_CHUNK + 1))
    with pytest.raises(CompressionError, match=r"plain length 1048577 exceeds the limit"):
        await receiver.receive_some()
    assert receiver.stats.plain_bytes == 0


# ----------------------------------------------------------------- the relay threads


@asynccontextmanager
async def zstd_endpoint() -> AsyncIterator[tuple[TlsStream, ZstdStream, ZstdSocketEnd]]:
    """A peer's TLS stream (to write chunks on as they are) and the endpoint a relay
    thread would read them from: zstd over real TLS over a socket pair."""
    peer_socket, our_socket = await socket_streams()
    peer, ours = await tls_pair(peer_socket, our_socket)
    stream = wrap(ours)
    end = socket_end(stream)
    assert isinstance(end, ZstdSocketEnd)
    try:
        yield peer, stream, end
    finally:
        end.finish()
        await trio.aclose_forcefully(peer)
        await trio.aclose_forcefully(ours)


async def read(end: AnySocketEnd) -> bytes:
    """The next bytes, waiting for the socket as the relay thread would."""
    while True:
        data, wait = end.read()
        if data is not None:
            return data
        with trio.fail_after(10):
            if wait == select.POLLIN:
                await trio.lowlevel.wait_readable(end.fileno())
            else:
                await trio.lowlevel.wait_writable(end.fileno())


@pytest.mark.parametrize("plain_size", [128 * KIB, MAX_CHUNK], ids=["128KiB", "1MiB"])
async def test_thread_endpoint_decodes_one_chunk_per_recv(plain_size: int) -> None:
    wire = zeros_burst(BURST, plain_size)
    async with zstd_endpoint() as (peer, stream, end):
        await peer.send_all(wire)  # one small TLS write
        for n in range(1, 4):
            got = await read(end)
            assert got == bytes(plain_size)
            # The decoder's own accounting: one chunk per call, the rest still compressed.
            assert stream.received.zstd_chunks == n
            assert stream.received.plain_bytes == n * plain_size
            assert stream.received.wire_bytes < len(wire)


@pytest.mark.parametrize("plain_size", [128 * KIB + 1, 300_000, MAX_CHUNK])
async def test_thread_endpoint_decodes_a_chunk_up_to_the_limit(plain_size: int) -> None:
    big = bytes(range(256)) * (plain_size // 256) + bytes(plain_size % 256)
    async with zstd_endpoint() as (peer, _, end):
        await peer.send_all(zstd_chunks(big, b"after"))
        assert await read(end) == big
        assert await read(end) == b"after"


async def test_thread_endpoint_refuses_a_chunk_over_the_limit() -> None:
    async with zstd_endpoint() as (peer, stream, end):
        await peer.send_all(zeros_burst(1, MAX_CHUNK + 1))
        with pytest.raises(LinkBroken, match=r"zstd: .*plain length 1048577 exceeds the limit"):
            await read(end)
        assert stream.received.plain_bytes == 0
