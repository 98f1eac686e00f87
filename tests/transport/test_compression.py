"""The zstd stream wrapper: Trio's stream conformance checks, framing, limits, hostile input."""

from __future__ import annotations

import os
import random
import ssl
import struct
from collections.abc import Callable

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


async def test_small_frames_use_the_shared_history() -> None:
    """Repeated small headers (USB/IP frames) shrink to a few bytes each after the first."""
    header = struct.pack(">IIIII", 1, 42, 0x10002, 0, 1) + bytes(28)
    sender, _, _ = await _round_trip([header] * 200)
    assert sender.sent.zstd_chunks == 200
    per_frame_after_first = (sender.sent.wire_bytes - 60) / 199
    assert per_frame_after_first < 25, sender.sent


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
    packed = zstandard.ZstdCompressor().compressobj()
    data = packed.compress(payload) + packed.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
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
    "bomb": (_zstd_chunk(bytes(64 * 1024 * 1024), declared=1000), "decompression bomb"),
    "short output": (_zstd_chunk(b"abc" * 100, declared=301), "decoded to 300 bytes"),
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


async def test_a_bomb_is_cut_off_early() -> None:
    """The decoder stops at the declared size plus one output step, not at 64 MiB."""
    sizes: list[int] = []
    decoder = Decoder()
    original: Callable[[bytes], int] = decoder._sink.write

    def spy(data: bytes) -> int:
        sizes.append(len(data))
        return original(data)

    decoder._sink.write = spy  # type: ignore[method-assign]
    decoder.receive_data(_zstd_chunk(bytes(64 * 1024 * 1024), declared=1000))
    with pytest.raises(CompressionError):
        decoder.next_chunk()
    assert sum(sizes) <= compression.DECODE_STEP


async def test_a_window_beyond_the_limit_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27)
    packer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = packer.compress(b"x" * 1000) + packer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    wire = struct.pack(">BII", ChunkType.ZSTD, len(data), 1000) + data
    decoder = Decoder()
    decoder.receive_data(wire)
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
