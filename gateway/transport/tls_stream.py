"""TLS on the standard library's `ssl.SSLSocket`, as a Trio stream.

OpenSSL reads and writes the connection's own socket (no memory BIOs, no copies through
Python), which is what lets an attached session's relay thread use the same TLS object
(`gateway.transport.socket_ends`). Trio drives the handshake and the op phase: the
socket is non-blocking, and a call that would block waits on the file descriptor with
`trio.lowlevel.wait_readable` / `wait_writable`.

One thread at a time uses the TLS object: Trio's (before and after the relay) or the
session's relay thread (in between, while Trio waits for it). OpenSSL does not promise
that one SSL object may be used from two threads at once, and reading can touch write
state (a peer's KeyUpdate): here that cannot happen by construction.

Post-handshake messages: a peer's TLS 1.3 KeyUpdate is taken by a read and, when it asks
for ours, answered by OpenSSL on the next write; the session carries on
(tests/relay/test_key_update.py). Session tickets are read and dropped. Renegotiation is
off (`OP_NO_RENEGOTIATION`; TLS 1.3 has none), so a write never needs to read; one that
asks anyway waits for readability like a read would.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Literal, overload

import trio

RECEIVE_SIZE = 64 * 1024


def take_socket(stream: trio.SocketStream) -> socket.socket:
    """The connection under `stream` as a standard-library socket, non-blocking; the
    Trio stream is left without one (closing it closes nothing)."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


def close_socket(sock: socket.socket) -> None:
    """Close a socket Trio may be watching (tasks waiting on it are woken)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()


class TlsStream(trio.abc.Stream):
    """A TLS connection over a socket it owns. Call `do_handshake()` first.

    States: handshaking, open, broken (a call failed, or a send was interrupted midway:
    OpenSSL must be called again with the same data, which nobody will), closed.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        sock.setblocking(False)
        self.socket: ssl.SSLSocket = context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,  # an EOF without close_notify is an error
        )
        self._handshook = False
        self._broken: BaseException | None = None
        self._closed = False
        self._receiving = False
        self._sending = False

    @classmethod
    def over(
        cls,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> TlsStream:
        """TLS over the socket of `stream` (which is left without one)."""
        return cls(
            take_socket(stream),
            context,
            server_side=server_side,
            server_hostname=server_hostname,
        )

    # -- what the handshake established

    @overload
    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...
    @overload
    def getpeercert(self, binary_form: Literal[False] = ...) -> Any: ...
    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.socket.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self.socket.selected_alpn_protocol()

    @property
    def handshook(self) -> bool:
        return self._handshook

    # -- I/O

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("this TLS stream is broken") from self._broken

    async def _call(self, operation: Any, *args: Any) -> Any:
        """`operation(*args)` on the TLS object, waiting on the socket until it does not
        need to; errors mark the stream broken."""
        sock = self.socket
        waited = False
        try:
            while True:
                try:
                    result = operation(*args)
                except ssl.SSLWantReadError:
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    waited = True
                    await trio.lowlevel.wait_writable(sock)
                else:
                    break
        except (ssl.SSLError, OSError) as exc:
            self._broken = exc
            # As trio.SSLStream does: no message of its own, the cause says what broke.
            raise trio.BrokenResourceError from exc
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def do_handshake(self) -> None:
        """The TLS handshake; idempotent once done."""
        self._check()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._call(self.socket.do_handshake)
        except trio.Cancelled as exc:
            self._broken = exc
            raise
        self._handshook = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not self._handshook:
                await self.do_handshake()
            data: bytes = await self._call(self.socket.recv, max_bytes or RECEIVE_SIZE)
            return data  # b"" after the peer's close_notify
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not self._handshook:
                await self.do_handshake()
            with memoryview(data) as view:
                sent, total = 0, len(view)
                try:
                    while sent < total:
                        sent += await self._call(self.socket.send, view[sent:])
                except trio.Cancelled as exc:
                    if sent < total:
                        self._broken = exc  # OpenSSL may hold part of a record
                    raise
            if not total:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        """Send close_notify (when the stream is healthy) without waiting for the peer's,
        then close the socket; cancelled, it closes at once."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._handshook and self._broken is None:
                await self._close_notify()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._closed = True
            close_socket(self.socket)

    async def _close_notify(self) -> None:
        sock = self.socket
        while True:
            try:
                sock.unwrap()
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except ssl.SSLWantReadError:
                pass  # close_notify is out; the peer's answer is not awaited
            except (ssl.SSLError, OSError, ValueError):
                pass  # nothing more to say to a broken connection (or none to say it on)
            await trio.lowlevel.checkpoint()
            return
