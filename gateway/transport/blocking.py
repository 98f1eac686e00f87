"""A connection's socket (and its TLS state) used from a blocking OS thread.

An attached session's URBs cross each gateway twice, and on Trio every crossing costs a
pass through the run loop per read, per write and per TLS record. Blocking calls in a
thread cost one wakeup per read: `recv`, `send` and OpenSSL release the GIL while they
wait or work. `endpoint()` lends a relay a stream's socket for that: a plain TCP stream,
or a TLS stream whose handshake is done, keeping its `ssl.SSLObject` and memory BIOs so
that Trio's `SSLStream` can still send close_notify afterwards, and a zstd layer above
either, with the layer's encoder and decoder.

One thread reads an endpoint while another writes it. The TLS object is never used by
both at once (`_tls_lock`); bytes it produced leave in the order it produced them
(`_send_lock`, taken before `_tls_lock` is released, never the other way round).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

import trio

from gateway.transport.compression import (
    ByteCounter,
    CompressionError,
    Decoder,
    Encoder,
    ZstdStream,
)
from gateway.transport.direct import std_socket

RAW_RECEIVE_SIZE = 128 * 1024
TLS_READ_SIZE = 16 * 1024  # one record's plaintext at most: no oversized allocation per call


_NO_CLOSE_NOTIFY = "the peer closed the connection without a TLS close_notify"


class LinkBroken(Exception):
    """The connection failed (reset, TLS error); the message says how."""


class Endpoint:
    """A plain TCP connection, driven with blocking calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._stopped = False
        self._buffer = memoryview(b"")

    def start(self) -> None:
        """Blocking mode for the relay's threads (Trio keeps it non-blocking)."""
        self.sock.setblocking(True)
        self._buffer = memoryview(bytearray(RAW_RECEIVE_SIZE))

    def finish(self) -> None:
        """Back to Trio: non-blocking again, for the graceful close."""
        if self.sock.fileno() != -1:
            self.sock.setblocking(False)

    def recv(self) -> bytes:
        """Whatever arrived (at least one byte), or b"" at the end of the stream."""
        # Into one buffer, then copied to its exact size: `recv(size)` would allocate
        # `size` bytes and shrink them each time, which fragments the heap of a
        # process whose threads all do it (hundreds of MiB with 100 sessions).
        try:
            count = self.sock.recv_into(self._buffer)
        except OSError as exc:
            raise LinkBroken(_describe(exc)) from exc
        return self._buffer[:count].tobytes()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise LinkBroken(_describe(exc)) from exc

    def stop_reading(self) -> None:
        """Wake a thread blocked in `recv` (it sees the end of the stream); the write
        side stays open for a graceful close."""
        self._stopped = True
        self._shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """Wake every thread blocked on this connection, whatever it waits for."""
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):  # not connected any more: nothing waits on it
            self.sock.shutdown(how)


class TlsEndpoint(Endpoint):
    """A TLS connection after its handshake: records in and out through `ssl_object`."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        stream: Any = None,
    ) -> None:
        super().__init__(sock)
        self._stream = stream
        self._tls = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._eof = False  # close_notify received
        self._raw_eof = False
        self._fed = True  # bytes may wait in the TLS object: decrypt before reading more

    def start(self) -> None:
        super().start()
        # Trio holds a TLS 1.3 server's session tickets back until its first write
        # (OpenSSL issue 7948); they go first in line here.
        delayed = getattr(self._stream, "_delayed_outgoing", None)
        if delayed:
            self._outgoing.write(delayed)
            self._stream._delayed_outgoing = None

    def recv(self) -> bytes:
        while True:
            with self._tls_lock:
                # Only after new bytes (or at the start, when Trio may have left some):
                # a read with nothing buffered is a wasted OpenSSL call and exception.
                data, self._fed = (self._decrypt() if self._fed else b""), False
                out = self._outgoing.read() if self._outgoing.pending else b""
                if out:
                    # A record the read produced (a KeyUpdate answer): send it in order.
                    self._send_lock.acquire()
            if out:
                self._send_locked(out)
            if data or self._eof:
                return data
            if self._raw_eof:
                raise LinkBroken(_NO_CLOSE_NOTIFY)
            raw = super().recv()
            if not raw and self._stopped:
                # Our own shutdown, not the peer's: leave the TLS state as it is, so
                # that the graceful close can still send close_notify.
                return b""
            self._raw_eof = not raw
            with self._tls_lock:
                if raw:
                    self._incoming.write(raw)
                else:
                    self._incoming.write_eof()
                self._fed = True

    def _decrypt(self) -> bytes:
        """Every plaintext byte the buffered records hold (several records per call)."""
        chunks = []
        try:
            while True:
                chunk = self._tls.read(TLS_READ_SIZE)
                if not chunk:  # close_notify (the standard library's SSLObject)
                    self._eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True  # close_notify
        except ssl.SSLEOFError as exc:
            if not chunks:
                raise LinkBroken(_NO_CLOSE_NOTIFY) from exc
        except ssl.SSLError as exc:
            if not chunks:
                raise LinkBroken(f"TLS: {_describe(exc)}") from exc
            # Hand out what came before the bad record; the next call raises again.
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data: bytes) -> None:
        with self._tls_lock:
            try:
                self._tls.write(data)
            except ssl.SSLError as exc:
                raise LinkBroken(f"TLS: {_describe(exc)}") from exc
            out = self._outgoing.read()
            self._send_lock.acquire()
        self._send_locked(out)

    def _send_locked(self, data: bytes) -> None:
        try:
            super().send(data)
        finally:
            self._send_lock.release()


class ZstdEndpoint:
    """zstd chunks (`gateway.transport.compression`) over another endpoint."""

    def __init__(self, inner: Endpoint, stream: ZstdStream) -> None:
        self.inner = inner
        self._stream = stream
        self._encoder: Encoder | None = None
        self._decoder: Decoder | None = None
        self._ready = b""
        self._on_bytes: ByteCounter | None = None

    def start(self) -> None:
        self.inner.start()
        self._encoder, self._decoder, self._ready, self._on_bytes = self._stream.take_codec()

    def finish(self) -> None:
        self.inner.finish()

    def stop_reading(self) -> None:
        self.inner.stop_reading()

    def abort(self) -> None:
        self.inner.abort()

    def recv(self) -> bytes:
        if self._ready:
            ready, self._ready = self._ready, b""
            return ready
        decoder = self._decoder
        assert decoder is not None, "start() first"
        try:
            while True:
                # One chunk per call: a burst of small chunks that each decode to a lot
                # stays compressed until the relay has forwarded the one before.
                chunk = decoder.next_chunk()
                if chunk is not None:
                    wire, plain = chunk
                    if self._on_bytes is not None:
                        self._on_bytes("decompress", wire, len(plain))
                    return plain
                data = self.inner.recv()
                if not data:
                    decoder.check_end()
                    return b""
                decoder.receive_data(data)
        except CompressionError as exc:
            raise LinkBroken(f"zstd: {exc}") from exc

    def send(self, data: bytes) -> None:
        assert self._encoder is not None, "start() first"
        encoded = self._encoder.encode(data)
        if self._on_bytes is not None:
            self._on_bytes("compress", len(data), len(encoded))
        self.inner.send(encoded)


AnyEndpoint = Endpoint | ZstdEndpoint


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def endpoint(stream: trio.abc.Stream) -> AnyEndpoint | None:
    """`stream` as an endpoint, or None if it cannot be one (another kind of stream, a
    TLS stream in an unusual state): the relay then stays on Trio.

    Call it while no task uses `stream`, and hand the stream back to Trio only after
    `finish()`. A compression layer's state moves to the endpoint: once called, the
    relay must use the endpoint.
    """
    if isinstance(stream, ZstdStream):
        inner = _plain_or_tls(stream.transport)
        if inner is None:
            return None
        return ZstdEndpoint(inner, stream)
    return _plain_or_tls(stream)


def _plain_or_tls(stream: trio.abc.Stream) -> Endpoint | None:
    sock = std_socket(stream)
    if sock is not None:
        return Endpoint(sock)
    if not isinstance(stream, trio.SSLStream):
        return None
    sock = std_socket(stream.transport_stream)
    tls: Any = stream  # its TLS state is private; checked field by field
    ssl_object = getattr(tls, "_ssl_object", None)
    incoming = getattr(tls, "_incoming", None)
    outgoing = getattr(tls, "_outgoing", None)
    handshook = getattr(getattr(tls, "_handshook", None), "done", False)
    if (
        sock is None
        or not isinstance(ssl_object, ssl.SSLObject)
        or not isinstance(incoming, ssl.MemoryBIO)
        or not isinstance(outgoing, ssl.MemoryBIO)
        or not handshook
        or not isinstance(getattr(tls, "_delayed_outgoing", b""), bytes | None)
        or outgoing.pending
        or getattr(getattr(tls, "_state", None), "name", None) != "OK"
    ):
        return None
    return TlsEndpoint(sock, ssl_object, incoming, outgoing, tls)
