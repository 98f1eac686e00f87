"""A connection's socket for the relay thread of an attached session: the data plane.

An attached session's URBs cross each gateway twice, and on Trio every crossing costs a
pass through the run loop per read, per write and per TLS record. One OS thread per
session instead serves both directions in a `poll` loop (`gateway.relay.pumps`), as
stunnel does: one wakeup per read, and no second thread of the same session to hand the
GIL to and from on every system call. `socket_end()` lends the relay a stream's
connection for that: a plain TCP (or MPTCP) socket, taken from its `trio.SocketStream`,
or a `TlsStream`'s `ssl.SSLSocket` after its handshake, and a zstd layer above either,
with the layer's encoder and decoder.

Every call here is non-blocking and says what to wait for: `read()` returns the bytes
and the poll events to wait for before reading again (0: read again at once), `write()`
how much went out and, when nothing could, the events to wait for. One thread owns the
TLS object for the whole data phase: handshake and op phase before it and close_notify
after it run on Trio, never at the same time, so reads and writes never meet in OpenSSL.
A peer's KeyUpdate taken by a read is answered by the next write, and a read or write
that needs the other kind of readiness says so (`POLLOUT` from a read, `POLLIN` from a
write).
"""

from __future__ import annotations

import select
import socket
import ssl
import sys

import trio

from gateway.transport.compression import (
    CompressionError,
    Decoder,
    Encoder,
    ZstdStream,
)
from gateway.transport.tls_stream import TlsStream, close_socket, take_socket

RECEIVE_SIZE = 128 * 1024
TLS_RECORD_SIZE = 16 * 1024  # the most plaintext one TLS record holds
# A TLS write encrypts at most this much per call, so the other direction is served
# between the steps of a large frame.
TLS_SEND_SIZE = 4 * TLS_RECORD_SIZE
READ, WRITE = select.POLLIN, select.POLLOUT

_NO_CLOSE_NOTIFY = "the peer closed the connection without a TLS close_notify"


# Receive buffers not in use. list.append and list.pop are atomic under the GIL, so
# threads share it without a lock; past `_POOLED_BUFFERS` spares, a buffer is dropped.
_BUFFERS: list[memoryview] = []
_POOLED_BUFFERS = 16


def _take_buffer() -> memoryview:
    try:
        return _BUFFERS.pop()
    except IndexError:
        return memoryview(bytearray(RECEIVE_SIZE))


def _give_buffer(view: memoryview) -> None:
    if len(_BUFFERS) < _POOLED_BUFFERS:
        _BUFFERS.append(view)


class LinkBroken(Exception):
    """The connection failed (reset, TLS error); the message says how."""


class SocketEnd:
    """A socket, plain or TLS, read and written by the one relay thread of its session.

    `owned`: the endpoint closes the socket in `finish()` (taken from a SocketStream);
    otherwise its stream does (a TlsStream, for close_notify).
    """

    def __init__(self, sock: socket.socket, *, owned: bool = False) -> None:
        self.sock = sock
        self._tls = sock if isinstance(sock, ssl.SSLSocket) else None
        self._send_step = TLS_SEND_SIZE if self._tls is not None else sys.maxsize
        self._owned = owned
        self._error: LinkBroken | None = None  # after bytes read before it: next call
        self._eof = False  # after bytes read before it: next call

    def fileno(self) -> int:
        return self.sock.fileno()

    def finish(self) -> None:
        """The relay is done: close what is ours."""
        if self._owned:
            close_socket(self.sock)

    def read(self) -> tuple[bytes | None, int]:
        """(bytes, events to wait for before the next read: 0 for none), b"" at the end
        of the stream, or (None, events) when nothing could be read.

        The receive buffer is borrowed from a pool shared by every endpoint only while
        bytes are read: idle sessions hold none."""
        if self._error is not None:
            raise self._error
        if self._eof:
            return b"", 0
        tls = self._tls
        view = _take_buffer()
        got, wait = 0, 0
        try:
            while True:
                try:
                    if tls is None:
                        count = self.sock.recv_into(view[got:])
                    else:
                        # What SSLSocket.recv_into calls, one Python call less; with a
                        # buffer it returns a count.
                        read = tls.read(len(view) - got, view[got:])
                        count = read if isinstance(read, int) else len(read)
                except (ssl.SSLWantReadError, BlockingIOError):
                    wait = READ
                    break
                except ssl.SSLWantWriteError:
                    wait = WRITE
                    break
                except (ssl.SSLError, OSError) as exc:
                    if not got:
                        raise _broken(exc) from exc
                    self._error = _broken(exc)
                    break
                if count == 0:  # the end of the stream (TLS: close_notify)
                    self._eof = True
                    break
                got += count
                if tls is None:
                    # All the kernel had (one call), unless it filled the buffer.
                    wait = READ if got < len(view) else 0
                    break
                if got == len(view):
                    break
                if count < TLS_RECORD_SIZE and not tls.pending():
                    # A record shorter than the most one holds, read whole: most likely
                    # the end of the peer's write. Wait for more rather than try a read
                    # that fails; nothing of it stays inside OpenSSL, so `poll` sees
                    # what comes.
                    wait = READ
                    break
            if not got:
                return (b"", 0) if self._eof else (None, wait)
            # Copied to its exact size: the relay may hold on to part of it (a partial
            # frame), the buffer goes back to the pool now.
            return view[:got].tobytes(), wait
        finally:
            _give_buffer(view)

    def write(self, data: memoryview) -> tuple[int, int]:
        """(bytes sent, 0), or (0, events to wait for). After a TLS write that could not
        go out, call again with the same bytes."""
        try:
            return self.sock.send(data[: self._send_step]), 0
        except (ssl.SSLWantWriteError, BlockingIOError):
            return 0, WRITE
        except ssl.SSLWantReadError:
            return 0, READ
        except (ssl.SSLError, OSError) as exc:
            raise _broken(exc) from exc


class ZstdSocketEnd:
    """zstd chunks (`gateway.transport.compression`) over another endpoint."""

    def __init__(self, inner: SocketEnd, stream: ZstdStream) -> None:
        self.inner = inner
        self._encoder: Encoder
        self._decoder: Decoder
        self._encoder, self._decoder, self._ready, self._on_bytes = stream.take_codec()
        self._inner_wait = 0  # what the inner endpoint said after its last bytes
        self._out = memoryview(b"")  # encoded bytes not yet written

    def fileno(self) -> int:
        return self.inner.fileno()

    def finish(self) -> None:
        self.inner.finish()

    def read(self) -> tuple[bytes | None, int]:
        """One decoded chunk per call: a burst of small chunks that each decode to a lot
        stays compressed until the relay has forwarded the one before."""
        if self._ready:
            ready, self._ready = self._ready, b""
            return ready, 0
        decoder = self._decoder
        try:
            while True:
                chunk = decoder.next_chunk()
                if chunk is not None:
                    wire, plain = chunk
                    if self._on_bytes is not None:
                        self._on_bytes("decompress", wire, len(plain))
                    return plain, 0 if decoder.has_chunk() else self._inner_wait
                data, wait = self.inner.read()
                if data is None:
                    return None, wait
                if not data:
                    decoder.check_end()
                    return b"", 0
                decoder.receive_data(data)
                self._inner_wait = wait
                if wait and not decoder.has_chunk():
                    return None, wait
        except CompressionError as exc:
            raise LinkBroken(f"zstd: {exc}") from exc

    def write(self, data: memoryview) -> tuple[int, int]:
        """As `SocketEnd.write`: `data` is taken whole (encoded once), and reported sent
        once its encoding is; until then the caller offers the same bytes again."""
        if not self._out:
            encoded = self._encoder.encode(data)
            if self._on_bytes is not None:
                self._on_bytes("compress", len(data), len(encoded))
            self._out = memoryview(encoded)
        while self._out:
            sent, wait = self.inner.write(self._out)
            if wait:
                return 0, wait
            self._out = self._out[sent:]
        return len(data), 0


AnySocketEnd = SocketEnd | ZstdSocketEnd


def _broken(exc: BaseException) -> LinkBroken:
    if isinstance(exc, ssl.SSLEOFError):
        return LinkBroken(_NO_CLOSE_NOTIFY)
    if isinstance(exc, ssl.SSLError):
        return LinkBroken(f"TLS: {_describe(exc)}")
    return LinkBroken(_describe(exc))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def socket_end(stream: trio.abc.Stream) -> AnySocketEnd:
    """`stream` as an endpoint: a `trio.SocketStream` (whose socket it takes), a
    `TlsStream` after its handshake, or a `ZstdStream` over either.

    Call it while no task uses `stream`. A compression layer's state moves to the
    endpoint, and a SocketStream's socket: once called, the relay must use the endpoint.
    """
    if isinstance(stream, ZstdStream):
        return ZstdSocketEnd(_plain_or_tls(stream.transport), stream)
    return _plain_or_tls(stream)


def _plain_or_tls(stream: trio.abc.Stream) -> SocketEnd:
    if isinstance(stream, trio.SocketStream):
        return SocketEnd(take_socket(stream), owned=True)
    if isinstance(stream, TlsStream):
        if not stream.handshook:
            raise ValueError("the TLS handshake is not done")
        return SocketEnd(stream.socket)
    raise TypeError(f"no socket to relay from under {type(stream).__name__}")
