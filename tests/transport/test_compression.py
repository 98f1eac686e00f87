"""The zstd stream wrapper: Trio's stream conformance checks, framing, limits, hostile input."""

from __future__ import annotations

import os
import random
import ssl
import struct

import pytest
import trio
import trio.testing
import trustme
import zstandard

from gateway.transport import compression
from gateway.transport.compression import (
    MAX_CHUNK,
    ChunkType,
    CompressionError,
    Decoder,
    Encoder,
    ZstdHalfCloseableStream,
    ZstdReceiveStream,
    ZstdSendStream,
    ZstdStream,
    alpn_protocols,
    check_level,
    wrap,
)
from gateway.transport.tls import ALPN_PLAIN, ALPN_ZSTD

WORDS = (
    b"the quick brown fox jumps over lazy dog usb device endpoint bulk transfer "
    b"interface descriptor request status configuration string serial number"
).split()


def text_like(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:size])


# ----------------------------------------------------------------- conformance


async def _memory_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    a, b = trio.testing.memory_stream_pair()
    return wrap(a), wrap(b)


async def _lockstep_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    a, b = trio.testing.lockstep_stream_pair()
    return wrap(a), wrap(b)


async def test_two_way_and_half_closeable_conformance() -> None:
    await trio.testing.check_half_closeable_stream(_memory_pair, _lockstep_pair)  # type: ignore[arg-type]


async def test_one_way_conformance() -> None:
    async def memory() -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
        s, r = trio.testing.memory_stream_one_way_pair()
        return ZstdSendStream(s), ZstdReceiveStream(r)

    async def lockstep() -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
        s, r = trio.testing.lockstep_stream_one_way_pair()
        return ZstdSendStream(s), ZstdReceiveStream(r)

    await trio.testing.check_one_way_stream(memory, lockstep)


async def test_two_way_conformance_over_tls() -> None:
    """The production stack: zstd over TLS over a byte stream (not half-closeable)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gw.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def make() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        client = trio.SSLStream(a, client_ctx, server_hostname="gw.test")
        server = trio.SSLStream(b, server_ctx, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        wrapped = wrap(client), wrap(server)
        assert all(type(w) is ZstdStream for w in wrapped)
        return wrapped

    await trio.testing.check_two_way_stream(make, None)


def test_wrap_is_half_closeable_only_over_a_half_closeable_transport() -> None:
    a, _ = trio.testing.memory_stream_pair()
    assert isinstance(wrap(a), ZstdHalfCloseableStream)
    assert not isinstance(ZstdStream(a), trio.abc.HalfCloseableStream)


# ----------------------------------------------------------------- behaviour


async def _round_trip(
    payloads: list[bytes], read_size: int | None = None
) -> tuple[ZstdStream, ZstdStream, bytes]:
    a, b = trio.testing.memory_stream_pair()
    sender, receiver = wrap(a), wrap(b)
    expected = b"".join(payloads)
    got = bytearray()

    async def send() -> None:
        for p in payloads:
            await sender.send_all(p)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while len(got) < len(expected):
            chunk = await receiver.receive_some(read_size)
            assert chunk
            got += chunk
    assert bytes(got) == expected
    return sender, receiver, expected


async def test_text_compresses() -> None:
    sender, receiver, data = await _round_trip([text_like(256 * 1024)])
    assert sender.sent.zstd_chunks == 4
    assert sender.sent.raw_chunks == 0
    assert sender.sent.ratio > 2.5, sender.sent
    assert receiver.received.plain_bytes == len(data)
    assert receiver.received.wire_bytes == sender.sent.wire_bytes


async def test_random_data_is_sent_raw() -> None:
    data = os.urandom(300 * 1024)
    sender, _, _ = await _round_trip([data])
    assert sender.sent.zstd_chunks == 0
    assert sender.sent.raw_chunks == 5  # 64 KiB pieces
    # Only the 5-byte chunk headers are added.
    assert sender.sent.wire_bytes == len(data) + 5 * 5


async def test_mixed_pieces_are_judged_one_by_one() -> None:
    chunk = compression.CHUNK_SIZE
    payload = text_like(chunk) + os.urandom(chunk) + bytes(chunk) + os.urandom(chunk)
    sender, _, _ = await _round_trip([payload])
    assert (sender.sent.zstd_chunks, sender.sent.raw_chunks) == (2, 2)


async def test_a_lone_usbip_header_compresses_against_the_dictionary() -> None:
    """Chunks share no history, yet a 48-byte USB/IP header on its own shrinks, because
    the frames are compressed against the built-in dictionary of headers; every chunk
    costs the same (nothing carried from one to the next)."""
    submit = struct.pack(">IIIIIIiIII", 1, 42, 0x10002, 1, 1, 0x200, 512, 0, 0, 0) + bytes(8)
    ret = struct.pack(">IIIIIiiiIi", 3, 42, 0, 0, 0, 0, 512, 0, 0, 0) + bytes(8)
    for header in (submit, ret):
        sender, _, _ = await _round_trip([header] * 50)
        assert sender.sent.zstd_chunks == 50
        per_chunk = sender.sent.wire_bytes / 50
        assert per_chunk == int(per_chunk)  # all alike
        without_dictionary = len(zstandard.ZstdCompressor(level=3).compress(header)) + 9
        assert per_chunk < min(len(header) + 5, without_dictionary), (per_chunk, header)


def test_streams_hold_no_zstd_context() -> None:
    """Contexts are borrowed per chunk from pools shared by every stream: a hundred
    encoders and decoders that each coded chunks, in turn, needed one context of each
    kind; a thread coding at the same time as another gets a context of its own."""
    pools = (compression.compressors(compression.DEFAULT_LEVEL), compression.DECOMPRESSORS)
    made = [pool.made for pool in pools]
    pairs = [(Encoder(), Decoder()) for _ in range(100)]
    for round_ in range(3):
        for i, (encoder, decoder) in enumerate(pairs):
            data = text_like(70_000, seed=i + round_)
            decoder.receive_data(encoder.encode(data))
            out = b""
            while (chunk := decoder.next_chunk()) is not None:
                out += chunk[1]
            assert out == data
    assert [pool.made - before for pool, before in zip(pools, made, strict=True)] in (
        [0, 0],
        [1, 1],
    )
    taken = [pools[0].take() for _ in range(3)]  # three threads compressing at once
    assert len({id(context) for context in taken}) == 3
    for context in taken:
        pools[0].give(context)
    assert pools[0].spares <= compression.POOLED_CONTEXTS


@pytest.mark.parametrize("read_size", [1, 7, 4096, None])
async def test_any_read_size_gets_the_bytes_in_order(read_size: int | None) -> None:
    rng = random.Random(read_size)
    payloads = [
        text_like(rng.randint(1, 3000), seed=i) if i % 2 else os.urandom(rng.randint(1, 3000))
        for i in range(40)
    ]
    if read_size != 1:
        payloads.append(text_like(200_000) + os.urandom(70_000))
    await _round_trip(payloads, read_size)


async def test_each_send_all_is_decodable_on_its_own() -> None:
    """No byte is held back in the compressor: the reader gets each send before the next."""
    a, b = trio.testing.memory_stream_pair()
    sender, receiver = wrap(a), wrap(b)
    for i in range(20):
        message = text_like(100 + i * 500, seed=i)
        await sender.send_all(message)
        got = bytearray()
        while len(got) < len(message):
            got += await receiver.receive_some()
        assert bytes(got) == message


async def test_byte_counters_feed_the_metrics_callback() -> None:
    calls: list[tuple[str, int, int]] = []

    def count(op: str, n_in: int, n_out: int) -> None:
        calls.append((op, n_in, n_out))

    a, b = trio.testing.memory_stream_pair()
    sender = ZstdStream(a, on_bytes=count)
    receiver = ZstdStream(b, on_bytes=count)
    data = text_like(100_000)
    await sender.send_all(data)
    got = bytearray()
    while len(got) < len(data):
        got += await receiver.receive_some()
    compress = [c for c in calls if c[0] == "compress"]
    decompress = [c for c in calls if c[0] == "decompress"]
    assert sum(c[1] for c in compress) == len(data)
    assert sum(c[2] for c in compress) == sender.sent.wire_bytes
    assert sum(c[1] for c in decompress) == sender.sent.wire_bytes
    assert sum(c[2] for c in decompress) == len(data)


def test_encoder_and_decoder_whole_and_one_byte_at_a_time() -> None:
    encoder = Encoder()
    data = text_like(150_000) + os.urandom(90_000) + b"tail"
    wire = encoder.encode(data) + encoder.encode(b"more")
    for step in (len(wire), 1):
        decoder = Decoder()
        out = bytearray()
        for i in range(0, len(wire), step):
            decoder.receive_data(wire[i : i + step])
            while (chunk := decoder.next_chunk()) is not None:
                out += chunk[1]
        assert bytes(out) == data + b"more"
        assert decoder.pending == 0


def test_levels_are_validated() -> None:
    assert check_level(1) == 1
    assert check_level(19) == 19
    for bad in (0, 20, -1):
        with pytest.raises(ValueError, match=r"outside 1\.\.19"):
            check_level(bad)
    with pytest.raises(TypeError):
        check_level(True)


def test_alpn_offers() -> None:
    assert alpn_protocols(True) == (ALPN_ZSTD, ALPN_PLAIN)
    assert alpn_protocols(False) == (ALPN_PLAIN,)


# ----------------------------------------------------------------- hostile input


def _zstd_chunk(payload: bytes, *, declared: int | None = None) -> bytes:
    data = zstandard.ZstdCompressor().compress(payload)  # one frame, its size declared
    plain = len(payload) if declared is None else declared
    return struct.pack(">BII", ChunkType.ZSTD, len(data), plain) + data


HOSTILE: dict[str, tuple[bytes, str]] = {
    "unknown type": (b"\x07\x00\x00\x00\x01x", "unknown chunk type 0x07"),
    "huge raw length": (struct.pack(">BI", ChunkType.RAW, MAX_CHUNK + 1), "exceeds the limit"),
    "huge zstd length": (
        struct.pack(">BII", ChunkType.ZSTD, 2**32 - 1, 10),
        "exceeds the limit",
    ),
    "huge plain length": (
        struct.pack(">BII", ChunkType.ZSTD, 10, MAX_CHUNK + 1),
        "plain length .* exceeds the limit",
    ),
    "empty chunk": (struct.pack(">BI", ChunkType.RAW, 0), "empty RAW chunk"),
    "bomb": (_zstd_chunk(bytes(64 * 1024 * 1024), declared=1000), "declares 67108864 bytes"),
    "short output": (_zstd_chunk(b"abc" * 100, declared=301), "declares 300 bytes, not .* 301"),
    "no declared size": (
        struct.pack(">BII", ChunkType.ZSTD, 12, 3)
        + zstandard.ZstdCompressor(write_content_size=False).compress(b"abc"),
        "declares no size",
    ),
    "two frames": (
        struct.pack(">BII", ChunkType.ZSTD, 24, 3)
        + zstandard.ZstdCompressor().compress(b"abc") * 2,
        "unused data",
    ),
    "not zstd": (struct.pack(">BII", ChunkType.ZSTD, 8, 8) + b"notzstd!", "corrupt zstd"),
    "truncated": (struct.pack(">BI", ChunkType.RAW, 100) + b"x" * 50, "ended inside a chunk"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_input_raises_a_clear_error(name: str) -> None:
    wire, message = HOSTILE[name]
    a, b = trio.testing.memory_stream_pair()
    receiver = wrap(b)
    await a.send_all(wire)
    await a.send_eof()
    with pytest.raises(CompressionError, match=message) as info:
        with trio.fail_after(10):
            await receiver.receive_some()
    # To the relay this is a lost connection, not a crash.
    assert isinstance(info.value, trio.BrokenResourceError)


def test_a_frame_that_lies_about_its_size_decodes_no_further() -> None:
    """A frame whose header declares the chunk's 1000 bytes but whose blocks hold 1 MiB:
    the decoder writes into a buffer of the declared size and fails there."""
    blocks = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    magic, descriptor, window = blocks[:4], blocks[4], blocks[5]
    assert descriptor == 0  # no size, not single segment: a window byte follows
    # Declare 1000: a 2-byte size field (value - 256), the same window, the same blocks.
    lying = magic + bytes([0x40, window]) + struct.pack("<H", 1000 - 256) + blocks[6:]
    assert zstandard.frame_content_size(lying) == 1000
    decoder = Decoder()
    decoder.receive_data(struct.pack(">BII", ChunkType.ZSTD, len(lying), 1000) + lying)
    with pytest.raises(CompressionError, match="corrupt zstd data"):
        decoder.next_chunk()


async def test_a_failed_send_breaks_the_stream_for_good() -> None:
    a, b = trio.testing.memory_stream_pair()
    sender = wrap(a)
    await b.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await sender.send_all(b"x" * 100)
    with pytest.raises(trio.BrokenResourceError, match="a previous send failed"):
        await sender.send_all(b"y")
