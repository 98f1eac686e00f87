"""zstd compression between the two gateways: a Trio stream wrapper that sits inside TLS.

Negotiated with TLS ALPN (`ALPN_ZSTD`), so there is no handshake of its own: both sides
wrap their TLS stream in a `ZstdStream` right after the TLS handshake, or neither does.

Wire format
-----------
Each direction is an independent sequence of chunks; there is no preamble (the ALPN name
carries the version). All integers are unsigned big-endian::

    RAW   (0x01):  type u8 | length u32 | length bytes, passed through as they are
    ZSTD  (0x02):  type u8 | length u32 | plain_length u32 | length bytes of zstd data

The ZSTD chunks of one direction are consecutive pieces of *one* zstd stream (one frame
that never ends), each ended by a block flush (ZSTD_e_flush). Earlier chunks are the
history later ones refer to, so small repetitive USB/IP headers compress to a few bytes,
and the receiver can decode each chunk as soon as it is whole: it must decode to exactly
`plain_length` bytes. RAW chunks are outside the zstd stream (neither side feeds them
to its zstd context).

Latency: every `send_all` is written out whole, compressed and flushed, before it
returns; nothing is held back for the next call. The relay calls `send_all` once per
batch of whole USB/IP frames, so a frame is never stuck in a compressor buffer.

Incompressible data: each piece of a `send_all` (up to `CHUNK_SIZE` bytes) is judged by
compressing a small sample of it (at most 4 KiB, spread over the piece) with a separate
one-shot zstd context at level 1. If the sample shrinks by less than `MIN_GAIN`, the
piece goes out as a RAW chunk and never touches the streaming compressor, so random or
already-compressed data (encrypted disks, media files) costs a sample, not a full
compression. Pieces shorter than `SAMPLE_MIN` always go through the stream.

Limits on input from the peer: `length` and `plain_length` are at most `MAX_CHUNK`
(1 MiB, sixteen times what a sender here ever writes), a chunk must not be empty, the zstd
window is capped at `MAX_WINDOW` (8 MiB) so a peer cannot make the decoder allocate a
huge window, and a ZSTD chunk whose data decodes to more than its `plain_length` is cut
off as soon as it does (output is produced in steps of `DECODE_STEP`, just over
`MAX_CHUNK`, and counted), so a decompression bomb costs at most one step of output
before it is refused. Every violation raises `CompressionError`, a
`trio.BrokenResourceError`: to the relay it is a lost connection, with a message naming
the problem.

Memory per read: a receiver decodes one chunk per `receive_some` (or per `recv` in a relay
thread) and reads from its transport only when no whole chunk is buffered, so
what a peer sends in one burst stays compressed until it is asked for. At any time a
receiver holds at most one chunk's plain data (`MAX_CHUNK`) plus one decode step, and
the compressed bytes of one partial chunk plus one transport read.

Security: compressing before encrypting lets someone who controls part of the plaintext
and sees the ciphertext's length learn other data in the same compression context
(CRIME/BREACH). See docs/compression-and-multipath.md before turning it on.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Literal, cast

import trio
import zstandard

from gateway.transport.reads import RECEIVE_SIZE
from gateway.transport.tls import ALPN_PLAIN, ALPN_ZSTD, negotiated_alpn
from gateway.transport.tls_stream import TlsStream

CHUNK_SIZE = 64 * 1024  # plain bytes per chunk a sender here writes
MAX_CHUNK = 1024 * 1024  # the most a receiver accepts, wire or plain, per chunk
MAX_WINDOW = 8 * 1024 * 1024  # zstd window a receiver accepts (level 19 uses 8 MiB)
SAMPLE_MIN = 512  # pieces shorter than this are compressed without sampling
SAMPLE_SLICES = 4
SAMPLE_SLICE = 1024
MIN_GAIN = 0.05  # a sample must shrink by at least 5% for its piece to be compressed
DEFAULT_LEVEL = 3
MIN_LEVEL, MAX_LEVEL = 1, 19  # 20-22 ("ultra") need windows beyond MAX_WINDOW
# Decompressed output is produced (and counted) this much at a time. It must exceed any
# chunk's plain size: zstandard's stream writer returns once the input is consumed, and
# what the decoder could not fit in a full output buffer would stay inside it, to come
# out at the start of the next chunk (a chunk larger than the step would not decode).
DECODE_STEP = MAX_CHUNK + 1
# A sender's history and match tables, capped: every session holds one compressor per
# gateway, and a level's defaults (2 MiB window, 512 KiB tables at level 3) cost about
# 0.9 MiB per session where these cost 0.24 once used (2^15 tables: 0.37), for a ratio
# within 1% on 64 KiB chunks of programs and text (3.32 against 3.35).
WINDOW_LOG, HASH_LOG, CHAIN_LOG = 17, 14, 14

_HEAD = struct.Struct(">BI")
_ZSTD_EXTRA = struct.Struct(">I")

Operation = Literal["compress", "decompress"]
ByteCounter = Callable[[Operation, int, int], None]
"""Called as (operation, bytes in, bytes out): `GatewayMetrics.compressed` fits."""


class ChunkType(enum.IntEnum):
    RAW = 0x01
    ZSTD = 0x02


class CompressionError(trio.BrokenResourceError):
    """The peer sent something that is not a valid compressed stream."""


def alpn_protocols(enabled: bool) -> tuple[str, ...]:
    """What to offer (client) or accept in order of preference (server)."""
    return (ALPN_ZSTD, ALPN_PLAIN) if enabled else (ALPN_PLAIN,)


def check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"zstd level must be an integer, not {level!r}")
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level {level} is outside {MIN_LEVEL}..{MAX_LEVEL}")
    return level


@dataclass
class CompressionStats:
    """Counts of one direction of one stream."""

    plain_bytes: int = 0  # given to send_all / returned by receive_some
    wire_bytes: int = 0  # written to / read from the transport, chunk headers included
    raw_chunks: int = 0
    zstd_chunks: int = 0

    @property
    def ratio(self) -> float:
        """Plain bytes per wire byte (above 1 means compression paid off)."""
        return self.plain_bytes / self.wire_bytes if self.wire_bytes else 1.0


# --------------------------------------------------------------------------- sans-I/O


class Encoder:
    """Plain bytes in, chunks out. One per direction; keeps the zstd history."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        check_level(level)
        self._stream = zstandard.ZstdCompressor(compression_params=_params(level)).compressobj()
        # Samples are at most SAMPLE_SLICES * SAMPLE_SLICE bytes: a small window will do.
        self._probe = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(
                1, window_log=12, hash_log=12, chain_log=12, write_content_size=False
            )
        )
        self.stats = CompressionStats()

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Chunks for `data`, everything flushed: the peer can decode all of it."""
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        for start in range(0, len(view), CHUNK_SIZE):
            piece = view[start : start + CHUNK_SIZE]
            if self._worth_compressing(piece):
                packed = self._stream.compress(piece) + self._stream.flush(
                    zstandard.COMPRESSOBJ_FLUSH_BLOCK
                )
                out.append(_HEAD.pack(ChunkType.ZSTD, len(packed)))
                out.append(_ZSTD_EXTRA.pack(len(piece)))
                out.append(packed)
                self.stats.zstd_chunks += 1
            else:
                out.append(_HEAD.pack(ChunkType.RAW, len(piece)))
                out.append(bytes(piece))
                self.stats.raw_chunks += 1
        encoded = b"".join(out)
        self.stats.plain_bytes += len(view)
        self.stats.wire_bytes += len(encoded)
        return encoded

    def _worth_compressing(self, piece: memoryview) -> bool:
        size = len(piece)
        if size < SAMPLE_MIN:
            return True
        if size <= SAMPLE_SLICES * SAMPLE_SLICE:
            sample = bytes(piece)
        else:
            step = (size - SAMPLE_SLICE) // (SAMPLE_SLICES - 1)
            sample = b"".join(
                piece[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES)
            )
        return len(self._probe.compress(sample)) <= len(sample) * (1 - MIN_GAIN)


def _params(level: int) -> zstandard.ZstdCompressionParameters:
    default = zstandard.ZstdCompressionParameters.from_level(level)
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=min(default.window_log, WINDOW_LOG),
        hash_log=min(default.hash_log, HASH_LOG),
        chain_log=min(default.chain_log, CHAIN_LOG),
    )


class _BoundedSink:
    """Where the zstd decoder writes; refuses more than the chunk declared."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise CompressionError(
                f"compressed chunk decodes to more than the {self.limit} bytes it declared "
                "(decompression bomb?)"
            )
        self.parts.append(data)
        return len(data)


class Decoder:
    """Chunks in, plain bytes out, with every length from the peer bounded."""

    def __init__(self) -> None:
        self._sink = _BoundedSink()
        sink = cast(IO[bytes], self._sink)  # the writer only ever calls write()
        self._stream = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_writer(
            sink, write_size=DECODE_STEP, write_return_read=True
        )
        self._buffer = bytearray()
        self.stats = CompressionStats()

    @property
    def pending(self) -> int:
        """Wire bytes received and not yet decoded (part of a chunk, or whole chunks)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed wire bytes. Nothing is decoded until `next_chunk` asks for it."""
        self._buffer += data

    def check_end(self) -> None:
        """The stream ended: raise if it ended inside a chunk."""
        if self._buffer:
            raise CompressionError(
                f"compressed stream ended inside a chunk ({len(self._buffer)} bytes of it received)"
            )

    def next_chunk(self) -> tuple[int, bytes] | None:
        """(wire size, plain data) of the next whole chunk, or None until one is in.

        One chunk at a time, so what a peer sends in one burst is decoded only as fast
        as the reader takes it.
        """
        head = self._header()
        if head is None or len(self._buffer) < head[1]:
            return None
        kind, total, plain_length = head
        body = memoryview(self._buffer)[self._body_start(kind) : total]
        try:
            plain = bytes(body) if kind is ChunkType.RAW else self._decode(body, plain_length)
        finally:
            body.release()
        del self._buffer[:total]
        if not self._buffer:
            # A bytearray keeps its largest size: an idle session should not.
            self._buffer = bytearray()
        self.stats.wire_bytes += total
        self.stats.plain_bytes += len(plain)
        if kind is ChunkType.RAW:
            self.stats.raw_chunks += 1
        else:
            self.stats.zstd_chunks += 1
        return total, plain

    @staticmethod
    def _body_start(kind: ChunkType) -> int:
        return _HEAD.size + (_ZSTD_EXTRA.size if kind is ChunkType.ZSTD else 0)

    def _header(self) -> tuple[ChunkType, int, int] | None:
        """(type, whole chunk length, plain length) once the header is in, validated."""
        if len(self._buffer) < 1:
            return None
        try:
            kind = ChunkType(self._buffer[0])
        except ValueError:
            raise CompressionError(
                f"unknown chunk type 0x{self._buffer[0]:02x} in compressed stream"
            ) from None
        start = self._body_start(kind)
        if len(self._buffer) < start:
            return None
        _, length = _HEAD.unpack_from(self._buffer)
        plain_length = length
        if kind is ChunkType.ZSTD:
            (plain_length,) = _ZSTD_EXTRA.unpack_from(self._buffer, _HEAD.size)
        for what, value in (("length", length), ("plain length", plain_length)):
            if value > MAX_CHUNK:
                raise CompressionError(
                    f"{kind.name} chunk {what} {value} exceeds the limit of {MAX_CHUNK}"
                )
            if value == 0:
                raise CompressionError(f"empty {kind.name} chunk in compressed stream")
        return kind, start + length, plain_length

    def _decode(self, body: memoryview, plain_length: int) -> bytes:
        sink = self._sink
        sink.parts.clear()
        sink.size = 0
        sink.limit = plain_length
        try:
            self._stream.write(body)
        except CompressionError:
            raise
        except zstandard.ZstdError as exc:
            problem = str(exc)
        else:
            problem = ""
        if problem:
            raise CompressionError(f"corrupt zstd data from peer: {problem}")
        if sink.size != plain_length:
            raise CompressionError(
                f"compressed chunk decoded to {sink.size} bytes, not the {plain_length} it declared"
            )
        plain = b"".join(sink.parts)
        sink.parts.clear()
        return plain


# --------------------------------------------------------------------------- Trio streams


class _Guard:
    """One task at a time per direction, as Trio's own streams insist."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *_: object) -> None:
        self._held = False


class ZstdSendStream(trio.abc.SendStream):
    """Compresses onto `transport`. States: open, broken (a send failed midway), closed."""

    def __init__(
        self,
        transport: trio.abc.SendStream,
        *,
        level: int = DEFAULT_LEVEL,
        on_bytes: ByteCounter | None = None,
    ) -> None:
        self.transport = transport
        self.encoder = Encoder(level)
        self._on_bytes = on_bytes
        self._guard = _Guard("another task is using this stream for sending")
        self._closed = False
        self._eof_sent = False
        self._broken: BaseException | None = None

    @property
    def stats(self) -> CompressionStats:
        return self.encoder.stats

    def _check(self) -> None:
        if self._closed or self._eof_sent:
            raise trio.ClosedResourceError("this stream was closed for sending")
        if self._broken is not None:
            raise trio.BrokenResourceError("a previous send failed") from self._broken

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._guard:
            self._check()
            if not data:
                await self.transport.send_all(b"")
                return
            # Encoded before the first await: the caller may reuse its buffer, and a
            # cancellation cannot leave half a piece in the compressor.
            encoded = self.encoder.encode(data)
            if self._on_bytes is not None:
                self._on_bytes("compress", len(data), len(encoded))
            try:
                await self.transport.send_all(encoded)
            except trio.ClosedResourceError:
                raise
            except BaseException as exc:
                # Part of `encoded` may be out, and the zstd history holds all of it:
                # this direction cannot continue.
                self._broken = exc
                raise

    async def wait_send_all_might_not_block(self) -> None:
        with self._guard:
            self._check()
            await self.transport.wait_send_all_might_not_block()

    async def _send_eof(self) -> None:
        with self._guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            self._eof_sent = True
            transport = self.transport
            assert isinstance(transport, trio.abc.HalfCloseableStream)
            await transport.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self.transport.aclose()


class ZstdReceiveStream(trio.abc.ReceiveStream):
    """Decompresses from `transport`, bounding what the peer can make it hold."""

    def __init__(
        self, transport: trio.abc.ReceiveStream, *, on_bytes: ByteCounter | None = None
    ) -> None:
        self.transport = transport
        self.decoder = Decoder()
        self._on_bytes = on_bytes
        self._guard = _Guard("another task is using this stream for receiving")
        self._ready = b""  # one decoded chunk, returned from _offset on
        self._offset = 0
        self._closed = False
        self._eof = False

    @property
    def stats(self) -> CompressionStats:
        return self.decoder.stats

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = _check_max_bytes(max_bytes)
        with self._guard:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            awaited = False
            while self._offset == len(self._ready) and not self._eof:
                chunk = self.decoder.next_chunk()
                if chunk is not None:
                    wire, self._ready = chunk
                    self._offset = 0
                    if self._on_bytes is not None:
                        self._on_bytes("decompress", wire, len(self._ready))
                    break
                data = await self.transport.receive_some(RECEIVE_SIZE)
                awaited = True
                if data:
                    self.decoder.receive_data(data)
                    continue
                self._eof = True
                self.decoder.check_end()
            if not awaited:
                await trio.lowlevel.checkpoint()
            start = self._offset
            end = (
                len(self._ready) if max_bytes is None else min(start + max_bytes, len(self._ready))
            )
            self._offset = end
            if start == 0 and end == len(self._ready):
                return self._ready
            return self._ready[start:end]

    async def aclose(self) -> None:
        self._closed = True
        await self.transport.aclose()


def _check_max_bytes(max_bytes: object) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an integer or None, not {max_bytes!r}")
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


class ZstdStream(trio.abc.Stream):
    """Both directions over one two-way transport (the TLS stream between gateways)."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        level: int = DEFAULT_LEVEL,
        on_bytes: ByteCounter | None = None,
    ) -> None:
        self.transport = transport
        self._send = ZstdSendStream(transport, level=level, on_bytes=on_bytes)
        self._receive = ZstdReceiveStream(transport, on_bytes=on_bytes)

    @property
    def sent(self) -> CompressionStats:
        return self._send.stats

    @property
    def received(self) -> CompressionStats:
        return self._receive.stats

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._send.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._receive.receive_some(max_bytes)

    def take_codec(self) -> tuple[Encoder, Decoder, bytes, ByteCounter | None]:
        """The encoder, the decoder, the decoded bytes not yet returned and the byte
        counter: for a relay thread to carry on with (`gateway.transport.blocking`)."""
        receive = self._receive
        ready = receive._ready[receive._offset :]
        receive._ready, receive._offset = b"", 0
        return self._send.encoder, receive.decoder, ready, self._send._on_bytes

    async def aclose(self) -> None:
        # Both halves refuse further use even if closing the transport is cancelled.
        self._send._closed = True
        self._receive._closed = True
        await self.transport.aclose()


class ZstdHalfCloseableStream(ZstdStream, trio.abc.HalfCloseableStream):
    """A `ZstdStream` over a transport that can send EOF (everything is flushed already)."""

    async def send_eof(self) -> None:
        await self._send._send_eof()


def wrap(
    transport: trio.abc.Stream,
    *,
    level: int = DEFAULT_LEVEL,
    on_bytes: ByteCounter | None = None,
) -> ZstdStream:
    """A `ZstdStream`, half-closeable if `transport` is."""
    cls = (
        ZstdHalfCloseableStream
        if isinstance(transport, trio.abc.HalfCloseableStream)
        else (ZstdStream)
    )
    return cls(transport, level=level, on_bytes=on_bytes)


def compress_if_negotiated(
    tls_stream: TlsStream, *, level: int = DEFAULT_LEVEL, on_bytes: ByteCounter | None
) -> trio.abc.Stream:
    """After the TLS handshake: `tls_stream` wrapped in a `ZstdStream` if ALPN chose
    `ALPN_ZSTD`, else `tls_stream` itself."""
    if negotiated_alpn(tls_stream) != ALPN_ZSTD:
        return tls_stream
    return wrap(tls_stream, level=level, on_bytes=on_bytes)
