"""A connection driven from OS threads: the attached session's data plane.

An attached session's URBs cross each gateway twice, and on Trio every crossing costs a
pass through the run loop per read, per write and per TLS record. A thread costs one
wakeup per read: `recv`, `send`, `poll` and OpenSSL release the GIL while they wait or
work. `socket_end()` lends a relay a stream's connection for that: a plain TCP (or MPTCP)
socket, taken from its `trio.SocketStream`, or a `TlsStream`'s `ssl.SSLSocket` after its
handshake, and a zstd layer above either, with the layer's encoder and decoder.

One thread reads an endpoint while another writes it. The socket stays non-blocking:
each thread calls it, and when the call would block, waits with `poll` for the socket or
the relay's wake-up. A TLS object is called only while holding its stream's lock (see
`gateway.transport.tls_stream`), one record read or at most `TLS_SEND_SIZE` written per
hold, and no thread waits while holding it: the reader and the writer never use OpenSSL
at once and neither holds up the other for long. A plain socket needs no lock.

`stop_reading()` and `abort()` wake the threads through the wake-up (an eventfd): the
TLS state is left as it is, so the stream can still send close_notify afterwards.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import sys
import threading
from contextlib import AbstractContextManager, nullcontext

import trio

from gateway.transport.compression import (
    ByteCounter,
    CompressionError,
    Decoder,
    Encoder,
    ZstdStream,
)
from gateway.transport.tls_stream import TlsStream, close_socket, take_socket

RECEIVE_SIZE = 128 * 1024
TLS_RECORD_SIZE = 16 * 1024  # the most plaintext one TLS record holds
TLS_SEND_SIZE = 4 * TLS_RECORD_SIZE

_NO_CLOSE_NOTIFY = "the peer closed the connection without a TLS close_notify"
_READ, _WRITE = select.POLLIN, select.POLLOUT
_FLUSH_POLL_MS = 50


# Receive buffers not in use. list.append and list.pop are atomic under the GIL, so
# threads share it without a lock; past `_POOLED_BUFFERS` spares, a buffer is dropped.
_BUFFERS: list[memoryview] = []
_POOLED_BUFFERS = 16


def _take_buffer() -> memoryview:
    try:
        return _BUFFERS.pop()
    except IndexError:
        return memoryview(bytearray(RECEIVE_SIZE))


class LinkBroken(Exception):
    """The connection failed (reset, TLS error, aborted); the message says how."""


class Wakeup:
    """Wakes every thread waiting in `SocketEnd.wait`: once set, it stays readable."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        if self.fd != -1:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


class SocketEnd:
    """A socket (plain, or TLS with its lock) used by one reader and one writer thread.

    `owned`: the endpoint closes the socket in `finish()` (taken from a SocketStream);
    otherwise its stream does (a TlsStream, for close_notify).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        lock: threading.Lock | None = None,
        owned: bool = False,
    ) -> None:
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        # Only OpenSSL needs one: the kernel takes a recv and a send at once.
        self._lock: AbstractContextManager[object] = lock or (
            threading.Lock() if self._tls else nullcontext()
        )
        # A TLS send encrypts and writes at most this much per call (per hold of the
        # lock), so the reader is not kept from the TLS object for a whole large frame.
        self._send_step = TLS_SEND_SIZE if self._tls else sys.maxsize
        self._owned = owned
        self._wakeup: Wakeup | None = None
        self._stopped = False
        self._aborted = False
        self._error: LinkBroken | None = None  # after bytes read before it: next call
        # The last read found nothing more: wait before reading (saves a failing call).
        # Set at first too: a session's first bytes come after its handshake or import.
        self._drained = True
        self._pollers: dict[tuple[int, bool], select.poll] = {}

    def start(self, wakeup: Wakeup) -> None:
        self._wakeup = wakeup
        self._pollers = {
            (_READ, True): self._poller(_READ, wakeup),  # the reader's
            (_WRITE, True): self._poller(_WRITE, wakeup),  # the writer's
            (_WRITE, False): self._poller(_WRITE, None),  # the writer's once reading stopped
        }

    def _poller(self, events: int, wakeup: Wakeup | None) -> select.poll:
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if wakeup is not None:
            poller.register(wakeup.fd, _READ)
        return poller

    def finish(self) -> None:
        """The threads are done: close what is ours."""
        if self._owned:
            close_socket(self.sock)

    def stop_reading(self) -> None:
        """The reader returns b"" (the end of the stream); the writer carries on."""
        self._stopped = True
        if self._wakeup is not None:
            self._wakeup.set()

    def abort(self) -> None:
        """Both threads return at once: the reader with b"", the writer with LinkBroken."""
        self._stopped = self._aborted = True
        if self._wakeup is not None:
            self._wakeup.set()

    def _wait(self, events: int, *, reading: bool) -> None:
        """Until the socket is ready for `events` or the wake-up is set (outside the lock).

        Each thread polls with its own poll object; the rare wait for the other kind of
        readiness (TLS wanting to write while reading) gets a fresh one. Once reading has
        stopped, the wake-up stays set: a writer still flushing to a slow peer then looks
        for an abort every `_FLUSH_POLL_MS` instead of spinning on it."""
        wakeup = self._wakeup
        assert wakeup is not None, "start() first"
        if not reading and self._stopped and not self._aborted:
            flush = self._pollers[_WRITE, False] if events == _WRITE else self._poller(events, None)
            flush.poll(_FLUSH_POLL_MS)
            return
        if (events == _READ) == reading:
            poller = self._pollers[events, True]
        else:
            poller = self._poller(events, wakeup)
        poller.poll()

    def recv(self) -> bytes:
        """Whatever arrived (at least one byte), or b"" at the end of the stream.

        The receive buffer is borrowed from a pool shared by every endpoint only while
        bytes are being read, never while waiting: idle sessions hold none."""
        if self._error is not None:
            raise self._error
        view: memoryview | None = None
        got = 0
        try:
            while True:
                if self._stopped:
                    return b""
                if self._drained:
                    self._drained = False
                    self._wait(_READ, reading=True)
                    continue
                if view is None:
                    view = _take_buffer()
                try:
                    count, want = self._read_into(view[got:])
                except LinkBroken as exc:
                    if not got:
                        raise
                    self._error = exc
                    break
                if want:
                    if got:
                        self._drained = want == _READ
                        break
                    _BUFFERS.append(view)  # back to the pool while waiting
                    view = None
                    self._wait(want, reading=True)
                    continue
                if count == 0 or not self._tls:
                    got += count
                    # All the kernel had (one call), unless it filled the buffer.
                    self._drained = 0 < count < len(view)
                    break
                got += count  # a TLS record: more may follow without waiting
                if got == len(view):
                    break
                if count < TLS_RECORD_SIZE:
                    # Read whole (it fitted) and shorter than a full record: most likely
                    # the end of the peer's write. Wait for more rather than try a read
                    # that fails; nothing of it stays inside OpenSSL, so `poll` sees
                    # what comes.
                    self._drained = True
                    break
            # Copied to its exact size: `recv(size)` would allocate `size` bytes and
            # shrink them each time, which fragments the heap of a process whose threads
            # all do it.
            return view[:got].tobytes() if view is not None else b""
        finally:
            if view is not None and len(_BUFFERS) < _POOLED_BUFFERS:
                _BUFFERS.append(view)

    def _read_into(self, view: memoryview) -> tuple[int, int]:
        """(bytes read, 0) or (0, the poll events to wait for)."""
        try:
            with self._lock:
                return self.sock.recv_into(view), 0
        except ssl.SSLWantReadError:
            return 0, _READ
        except ssl.SSLWantWriteError:
            return 0, _WRITE
        except BlockingIOError:
            return 0, _READ
        except ssl.SSLEOFError as exc:
            raise LinkBroken(_NO_CLOSE_NOTIFY) from exc
        except ssl.SSLError as exc:
            raise LinkBroken(f"TLS: {_describe(exc)}") from exc
        except OSError as exc:
            raise LinkBroken(_describe(exc)) from exc

    def send(self, data: bytes | memoryview) -> None:
        with memoryview(data) as view:
            sent, total = 0, len(view)
            while sent < total:
                if self._aborted:
                    raise LinkBroken("aborted by the gateway")
                try:
                    with self._lock:
                        # After a "want", OpenSSL is called again with the same slice.
                        sent += self.sock.send(view[sent : sent + self._send_step])
                    continue
                except (ssl.SSLWantWriteError, BlockingIOError):
                    want = _WRITE
                except ssl.SSLWantReadError:
                    want = _READ
                except ssl.SSLError as exc:
                    raise LinkBroken(f"TLS: {_describe(exc)}") from exc
                except OSError as exc:
                    raise LinkBroken(_describe(exc)) from exc
                self._wait(want, reading=False)


class ZstdSocketEnd:
    """zstd chunks (`gateway.transport.compression`) over another endpoint."""

    def __init__(self, inner: SocketEnd, stream: ZstdStream) -> None:
        self.inner = inner
        self._stream = stream
        self._encoder: Encoder | None = None
        self._decoder: Decoder | None = None
        self._ready = b""
        self._on_bytes: ByteCounter | None = None

    def start(self, wakeup: Wakeup) -> None:
        self.inner.start(wakeup)
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

    def send(self, data: bytes | memoryview) -> None:
        assert self._encoder is not None, "start() first"
        encoded = self._encoder.encode(data)
        if self._on_bytes is not None:
            self._on_bytes("compress", len(data), len(encoded))
        self.inner.send(encoded)


AnySocketEnd = SocketEnd | ZstdSocketEnd


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
        return SocketEnd(stream.socket, lock=stream.lock)
    raise TypeError(f"no socket to relay from under {type(stream).__name__}")
