"""zstd compression between the two gateways: a Trio stream wrapper that sits inside TLS.

Negotiated with TLS ALPN (`ALPN_ZSTD`), so there is no handshake of its own: both sides
wrap their TLS stream in a `ZstdStream` right after the TLS handshake, or neither does.

Wire format
-----------
Each direction is an independent sequence of chunks; there is no preamble (the ALPN name
carries the version). All integers are unsigned big-endian::

    RAW   (0x01):  type u8 | length u32 | length bytes, passed through as they are
    ZSTD  (0x02):  type u8 | length u32 | plain_length u32 | length bytes of zstd data

Each ZSTD chunk is one whole zstd frame that declares its content size, compressed with
the raw-content dictionary `DICTIONARY` (typical USB/IP headers) as its prefix, so a
lone 48-byte header still compresses to about 25 bytes. Chunks share no history: every
chunk decodes on its own as soon as it is whole, to exactly `plain_length` bytes, and
the zstd contexts are pooled for the whole process (`Contexts`) instead of being held
by each session: a session's compression state is a few counters. Within a 64 KiB
chunk zstd finds the same matches; what is lost is history across chunks (about 6% of
ratio on 64 KiB chunks of programs and text).

Latency: every `send_all` is written out whole, compressed, before it returns; nothing
is held back for the next call. The relay calls `send_all` once per batch of whole
USB/IP frames, so a frame is never stuck in a compressor buffer.

Incompressible data: each piece of a `send_all` (up to `CHUNK_SIZE` bytes) is judged by
compressing a small sample of it (at most 4 KiB, spread over the piece) at level 1. If
the sample shrinks by less than `MIN_GAIN`, the piece goes out as a RAW chunk, so random
or already-compressed data (encrypted disks, media files) costs a sample, not a full
compression. Pieces shorter than `SAMPLE_MIN` are compressed without a sample, and sent
RAW if that did not make them smaller.

Limits on input from the peer: `length` and `plain_length` are at most `MAX_CHUNK`
(1 MiB, sixteen times what a sender here ever writes), a chunk must not be empty, and a
ZSTD chunk must hold exactly one zstd frame whose declared content size is its
`plain_length`. That is checked before decoding, and the decoder writes into a buffer of
that size: a frame that would decode to more fails there, so a decompression bomb costs
at most `plain_length` bytes. Every violation raises `CompressionError`, a
`trio.BrokenResourceError`: to the relay it is a lost connection, with a message naming
the problem.

Memory per read: a receiver decodes one chunk per `receive_some` (or per `recv` in a relay
thread) and reads from its transport only when no whole chunk is buffered, so
what a peer sends in one burst stays compressed until it is asked for. At any time a
receiver holds at most one chunk's plain data (`MAX_CHUNK`), and the compressed bytes of
one partial chunk plus one transport read.

Security: compressing before encrypting lets someone who controls part of the plaintext
and sees the ciphertext's length learn other data in the same compression context
(CRIME/BREACH). See docs/compression-and-multipath.md before turning it on.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

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
# Spare zstd contexts kept per pool: a context is borrowed for one chunk, so about as
# many exist as threads code at once, and these many stay for the next ones.
POOLED_CONTEXTS = 8
# A sender's window and match tables, capped (level 3's defaults are a 2 MiB window and
# 512 KiB of tables): every thread compressing at once holds one context.
WINDOW_LOG, HASH_LOG, CHAIN_LOG = 17, 14, 14

_HEAD = struct.Struct(">BI")
_ZSTD_EXTRA = struct.Struct(">I")
_USBIP_HEADER = struct.Struct(">5I5I8s")  # command, seqnum, devid, direction, ep; 5 more; 8


def _dictionary() -> bytes:
    """The prefix every ZSTD chunk is compressed against: USB/IP headers as vhci-hcd and
    usbip-host send them (device 1-2, bulk, interrupt and control). Part of the wire
    format of `ALPN_ZSTD`: changing a byte needs a new ALPN name."""
    devid, no_iso = 0x00010002, 0xFFFFFFFF
    get_descriptor = bytes.fromhex("8006000100001200")
    headers = [
        (4, 7, 0, 0, 0, 0xFFFFFF98, 0, 0, 0, 0, bytes(8)),  # RET_UNLINK -ECONNRESET
        (2, 7, devid, 0, 0, 6, 0, 0, 0, 0, bytes(8)),  # CMD_UNLINK
        (1, 1, devid, 1, 0, 0x200, 18, 0, no_iso, 0, get_descriptor),  # control IN
        (3, 1, 0, 0, 0, 0, 18, 0, no_iso, 0, bytes(8)),
        (1, 2, devid, 1, 1, 0x200, 8, 0, no_iso, 10, bytes(8)),  # interrupt IN
        (3, 2, 0, 0, 0, 0, 8, 0, 0, 0, bytes(8)),
        (1, 3, devid, 0, 2, 0, 512, 0, 0, 0, bytes(8)),  # bulk OUT
        (3, 3, 0, 0, 0, 0, 512, 0, no_iso, 0, bytes(8)),
        (1, 4, devid, 1, 1, 0x200, 65536, 0, no_iso, 0, bytes(8)),  # bulk IN
        (3, 4, 0, 0, 0, 0, 65536, 0, 0, 0, bytes(8)),
    ]
    return b"".join(_USBIP_HEADER.pack(*header) for header in headers)


DICTIONARY = _dictionary()
_Context = TypeVar("_Context")

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


class Contexts(Generic[_Context]):
    """zstd contexts shared by every stream of the process.

    A context is one caller's only while it compresses or decompresses one chunk (chunks
    are independent frames), so an idle session holds none, and there are about as many
    contexts as threads coding at once. list.pop and list.append are atomic under the
    GIL: threads share the list without a lock.
    """

    def __init__(self, make: Callable[[], _Context], spares: int = POOLED_CONTEXTS) -> None:
        self._make = make
        self._free: list[_Context] = []
        self._spares = spares
        self.made = 0  # contexts created, for tests and the curious

    @property
    def spares(self) -> int:
        return len(self._free)

    def take(self) -> _Context:
        try:
            return self._free.pop()
        except IndexError:
            self.made += 1
            return self._make()

    def give(self, context: _Context) -> None:
        if len(self._free) < self._spares:
            self._free.append(context)


def _params(level: int) -> zstandard.ZstdCompressionParameters:
    default = zstandard.ZstdCompressionParameters.from_level(level)
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=min(default.window_log, WINDOW_LOG),
        hash_log=min(default.hash_log, HASH_LOG),
        chain_log=min(default.chain_log, CHAIN_LOG),
        write_content_size=True,
        write_checksum=False,
        write_dict_id=False,
    )


def compressors(level: int) -> Contexts[zstandard.ZstdCompressor]:
    """The pool of one level, made once (a race makes two, and one is dropped)."""
    pool = _COMPRESSORS.get(level)
    if pool is None:
        params = _params(level)
        # One dictionary object per level: it holds the tables precomputed for it.
        prefix = zstandard.ZstdCompressionDict(DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        prefix.precompute_compress(compression_params=params)
        pool = _COMPRESSORS.setdefault(
            level,
            Contexts(lambda: zstandard.ZstdCompressor(dict_data=prefix, compression_params=params)),
        )
    return pool


_COMPRESSORS: dict[int, Contexts[zstandard.ZstdCompressor]] = {}
# Samples are at most SAMPLE_SLICES * SAMPLE_SLICE bytes: a small window will do.
PROBES = Contexts(
    lambda: zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            1, window_log=12, hash_log=12, chain_log=12, write_content_size=False
        )
    )
)
DECOMPRESSORS = Contexts(
    lambda: zstandard.ZstdDecompressor(
        dict_data=zstandard.ZstdCompressionDict(
            DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT
        ),
        max_window_size=MAX_WINDOW,
    )
)


class Encoder:
    """Plain bytes in, chunks out. One per direction; holds no zstd state between calls."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self._compressors = compressors(check_level(level))
        self.stats = CompressionStats()

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Chunks for `data`, each decodable on its own."""
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        compressor: zstandard.ZstdCompressor | None = None
        try:
            for start in range(0, len(view), CHUNK_SIZE):
                piece = view[start : start + CHUNK_SIZE]
                packed = b""
                if _worth_compressing(piece):
                    if compressor is None:
                        compressor = self._compressors.take()
                    packed = compressor.compress(piece)
                if packed and len(packed) + _ZSTD_EXTRA.size < len(piece):
                    out.append(_HEAD.pack(ChunkType.ZSTD, len(packed)))
                    out.append(_ZSTD_EXTRA.pack(len(piece)))
                    out.append(packed)
                    self.stats.zstd_chunks += 1
                else:  # random, or too small to gain: as it is
                    out.append(_HEAD.pack(ChunkType.RAW, len(piece)))
                    out.append(bytes(piece))
                    self.stats.raw_chunks += 1
        finally:
            if compressor is not None:
                self._compressors.give(compressor)
        encoded = b"".join(out)
        self.stats.plain_bytes += len(view)
        self.stats.wire_bytes += len(encoded)
        return encoded


def _worth_compressing(piece: memoryview) -> bool:
    size = len(piece)
    if size < SAMPLE_MIN:
        return True
    if size <= SAMPLE_SLICES * SAMPLE_SLICE:
        sample = bytes(piece)
    else:
        step = (size - SAMPLE_SLICE) // (SAMPLE_SLICES - 1)
        sample = b"".join(piece[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES))
    probe = PROBES.take()
    try:
        return len(probe.compress(sample)) <= len(sample) * (1 - MIN_GAIN)
    finally:
        PROBES.give(probe)


class Decoder:
    """Chunks in, plain bytes out, with every length from the peer bounded."""

    def __init__(self) -> None:
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

    def has_chunk(self) -> bool:
        """Whether a whole chunk is buffered (`next_chunk` would return it)."""
        head = self._header()
        return head is not None and len(self._buffer) >= head[1]

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
            plain = bytes(body) if kind is ChunkType.RAW else _decode(body, plain_length)
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


def _decode(body: memoryview, plain_length: int) -> bytes:
    """One whole zstd frame that declares `plain_length` and decodes to exactly that.

    The declared size is checked before decoding: the decoder writes into a buffer of
    that size and fails on a frame that would decode to more (a decompression bomb costs
    at most `plain_length` of memory, itself at most `MAX_CHUNK`)."""
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"corrupt zstd data from peer: {exc}") from None
    if declared != plain_length:
        said = "no size" if declared < 0 else f"{declared} bytes"
        raise CompressionError(
            f"zstd frame declares {said}, not the chunk's {plain_length} (decompression bomb?)"
        )
    decompressor = DECOMPRESSORS.take()
    try:
        plain = decompressor.decompress(body, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"corrupt zstd data from peer: {exc}") from None
    finally:
        DECOMPRESSORS.give(decompressor)
    if len(plain) != plain_length:
        raise CompressionError(
            f"compressed chunk decoded to {len(plain)} bytes, not the {plain_length} it declared"
        )
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
                # Part of `encoded` may be out: the peer would read the rest of a
                # chunk as the start of the next, so this direction cannot continue.
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
        counter: for a relay thread to carry on with (`gateway.transport.socket_ends`)."""
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
