"""A relay's sockets with fewer trips through Trio's scheduler.

`trio.SocketStream` makes every `receive_some` and `send_all` a full schedule point,
even when the socket had data waiting or room to write: each call is one more pass
through the run loop (an epoll poll and the task switching around it). A relay makes
two such calls per read and the TLS layer above it more, which on a busy machine costs
more than parsing and encrypting a frame. `DirectSocketStream` calls the socket at once,
waits on it only when it would block, and checks for cancellation every call; it yields
to other tasks every `YIELD_EVERY` calls that did not wait anyway, so one busy connection
cannot starve the others.

`direct_io` puts one under a relay's stream: a `SocketStream` itself, the transport of a
TLS stream, or the transport under a compression layer above TLS.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import trio

YIELD_EVERY = 8
DEFAULT_RECEIVE_SIZE = 64 * 1024

_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class DirectSocketStream(trio.abc.HalfCloseableStream):
    """The socket of `inner`, driven directly; closing it closes `inner`."""

    def __init__(self, inner: trio.SocketStream, sock: socket.socket) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._sock = sock
        self._calls = 0
        self._receiving = False
        self._sending = False

    async def _after(self) -> None:
        self._calls += 1
        if self._calls >= YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _check_open(self) -> None:
        if self._sock.fileno() == -1:
            raise trio.ClosedResourceError("the socket was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
            while True:
                try:
                    data = self._sock.recv(size)
                except BlockingIOError:
                    self._calls = 0
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                except _BROKEN as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                except OSError as exc:
                    raise _translate(exc) from exc
                await self._after()
                return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
            with memoryview(data) as view:
                sent = 0
                total = len(view)
                while sent < total:
                    try:
                        sent += self._sock.send(view[sent:])
                    except BlockingIOError:
                        self._calls = 0
                        await trio.lowlevel.wait_writable(self._sock)
                    except _BROKEN as exc:
                        raise trio.BrokenResourceError(str(exc)) from exc
                    except OSError as exc:
                        raise _translate(exc) from exc
            await self._after()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(str(exc))


def std_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The standard-library socket under a `trio.SocketStream`, else None."""
    if not isinstance(stream, trio.SocketStream):
        return None
    # Trio keeps it in `_sock`; without it (another Trio), there is none to drive.
    sock = getattr(stream.socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _direct(stream: trio.SocketStream) -> trio.abc.Stream:
    sock = std_socket(stream)
    return stream if sock is None else DirectSocketStream(stream, sock)


def direct_io(stream: trio.abc.Stream) -> trio.abc.Stream:
    """`stream` with its socket driven directly (see the module's docstring).

    Call it before the stream's first use by the relay and while no other task uses it:
    a TLS stream's transport is replaced in place.
    """
    if isinstance(stream, trio.SocketStream):
        return _direct(stream)
    if isinstance(stream, trio.SSLStream):
        transport = stream.transport_stream
        if isinstance(transport, trio.SocketStream):
            tls: Any = stream
            tls.transport_stream = _direct(transport)
        return stream
    inner = getattr(stream, "transport", None)
    if isinstance(inner, trio.abc.Stream):
        direct_io(inner)
    return stream
