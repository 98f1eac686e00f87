"""TCP (or MPTCP) sockets tuned for USB/IP relaying.

USB/IP is a request/response protocol of small frames, so Nagle's delay is pure latency:
TCP_NODELAY is always on. Keepalive probes notice a peer that vanished without a FIN (a
pulled cable, a NAT that forgot us) on connections that sit idle between URBs.

MPTCP is opt-in. An MPTCP socket talks plain TCP to a peer that lacks MPTCP, so the only
fallback needed here is for a kernel that refuses to create one.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import trio

from gateway.config import Address
from gateway.transport.tls_stream import TlsStream

log = logging.getLogger("gateway.transport")

IPPROTO_MPTCP: int = getattr(socket, "IPPROTO_MPTCP", 262)

_mptcp_fallback_logged = False


@dataclass(frozen=True)
class SocketOptions:
    keepalive_idle: int = 60  # seconds idle before the first probe
    keepalive_interval: int = 10  # seconds between probes
    keepalive_count: int = 6  # unanswered probes before the connection is dropped

    def apply(self, sock: trio.socket.SocketType, *, tolerant: bool = False) -> None:
        """Set the options; `tolerant` logs failures instead of raising.

        Tolerance is for accepted sockets and for MPTCP, on kernels that do not accept
        every TCP option for it yet.
        """
        for level, name, value in self._settings():
            try:
                sock.setsockopt(level, name, value)
            except OSError as exc:
                if not tolerant:
                    raise
                log.debug("setsockopt(%d, %d) failed: %s", level, name, exc)

    def _settings(self) -> Iterable[tuple[int, int, int]]:
        yield socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        yield socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1
        # Linux and most BSDs; macOS spells the idle time TCP_KEEPALIVE.
        idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
        for name, value in (
            (idle, self.keepalive_idle),
            (getattr(socket, "TCP_KEEPINTVL", None), self.keepalive_interval),
            (getattr(socket, "TCP_KEEPCNT", None), self.keepalive_count),
        ):
            if name is not None:
                yield socket.IPPROTO_TCP, name, value


class ListenError(OSError):
    """An address this process cannot listen on: in use, not this host's, or not allowed."""

    def __init__(self, address: str, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        hint = " (another process listens there)" if cause.errno == errno.EADDRINUSE else ""
        super().__init__(cause.errno, f"cannot listen on {address}: {reason}{hint}")
        self.address = address

    def __str__(self) -> str:
        return str(self.strerror)


async def close_listeners(listeners: list[TunedListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def listen_address(host: str | None, port: int) -> str:
    """HOST:PORT as the configuration writes it (all interfaces: `*`)."""
    if host is None or host == "":
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _new_socket(family: int, *, mptcp: bool) -> trio.socket.SocketType:
    global _mptcp_fallback_logged  # noqa: PLW0603 - say it once, not per connection
    if mptcp:
        try:
            return trio.socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        except OSError as exc:
            level = logging.DEBUG if _mptcp_fallback_logged else logging.WARNING
            _mptcp_fallback_logged = True
            log.log(level, "MPTCP unavailable (%s); falling back to TCP", exc.strerror or exc)
    return trio.socket.socket(family, socket.SOCK_STREAM)


def _is_mptcp(sock: trio.socket.SocketType) -> bool:
    return bool(sock.proto == IPPROTO_MPTCP)


TCP_IS_MPTCP: int = getattr(socket, "TCP_IS_MPTCP", 43)  # Linux >= 5.16
Transport = Literal["tcp", "mptcp"]


def uses_mptcp(sock: socket.socket | trio.socket.SocketType) -> bool:
    """Whether the connection on `sock` really runs MPTCP, not just an MPTCP socket.

    An MPTCP socket whose peer lacks MPTCP falls back to plain TCP, and so does one the
    server accepted from a TCP client; `sock.proto` says IPPROTO_MPTCP either way. The
    kernel answers `getsockopt(SOL_TCP, TCP_IS_MPTCP)` with 1 only while MPTCP is in use:
    after a fallback the call reaches the lone TCP subflow, which answers 0. Kernels
    before 5.16 do not know the option (ENOPROTOOPT): reported as not MPTCP.
    """
    if sock.proto != IPPROTO_MPTCP:
        return False
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP))
    except OSError:
        return False


def transport_name(stream: trio.SocketStream | TlsStream) -> Transport:
    """The transport in use, "mptcp" or "tcp", for session records, logs and metrics."""
    return "mptcp" if uses_mptcp(stream.socket) else "tcp"


async def open_tcp(
    host: str,
    port: int,
    *,
    connect_timeout: float,
    mptcp: bool = False,
    keepalive_idle: int = 60,
    keepalive_interval: int = 10,
    keepalive_count: int = 6,
) -> trio.SocketStream:
    """Connect to the first address of `host` that answers, within `connect_timeout` seconds.

    Addresses are tried one after another (no Happy Eyeballs: a gateway normally has one).
    Raises OSError; a timeout is a TimeoutError, which is one.
    """
    opts = SocketOptions(keepalive_idle, keepalive_interval, keepalive_count)
    where = Address(host, port)
    errors: list[OSError] = []
    try:
        with trio.fail_after(connect_timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for family, _type, _proto, _canon, addr in infos:
                sock = _new_socket(family, mptcp=mptcp)
                try:
                    opts.apply(sock, tolerant=_is_mptcp(sock))
                    await sock.connect(addr)
                except OSError as exc:
                    sock.close()
                    errors.append(exc)
                    continue
                except BaseException:
                    sock.close()
                    raise
                return trio.SocketStream(sock)
    except trio.TooSlowError:
        raise TimeoutError(
            errno.ETIMEDOUT,
            f"connecting to {Address(host, port)} timed out after {connect_timeout:g}s",
        ) from None
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"could not connect to {where}: " + "; ".join(str(e) for e in errors)) from (
        errors[-1] if errors else None
    )


class TunedListener(trio.abc.Listener[trio.SocketStream]):
    """A SocketListener whose accepted streams get the same socket options.

    Linux already copies the listening socket's options to accepted sockets; setting them
    again makes that explicit and portable. This wraps rather than subclasses because
    trio.SocketListener is final.
    """

    def __init__(self, inner: trio.SocketListener, options: SocketOptions) -> None:
        self._inner = inner
        self._options = options

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._inner.socket

    async def accept(self) -> trio.SocketStream:
        stream = await self._inner.accept()
        # Tolerant: the peer may already have reset the connection while it was queued.
        self._options.apply(stream.socket, tolerant=True)
        return stream

    async def aclose(self) -> None:
        await self._inner.aclose()


async def open_tcp_listeners(
    host: str | None,
    port: int,
    *,
    backlog: int = 128,
    mptcp: bool = False,
    keepalive_idle: int = 60,
    keepalive_interval: int = 10,
    keepalive_count: int = 6,
) -> list[TunedListener]:
    """Listen on every address of `host` (None: all interfaces, IPv4 and IPv6).

    With port 0 and several addresses each listener gets its own port.
    """
    opts = SocketOptions(keepalive_idle, keepalive_interval, keepalive_count)
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[TunedListener] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, _type, _proto, _canon, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = _new_socket(family, mptcp=mptcp)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # Separate v4 and v6 sockets, so both can bind the same port.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                opts.apply(sock, tolerant=_is_mptcp(sock))
                await sock.bind(addr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                raise ListenError(listen_address(host, port), exc) from exc
            except BaseException:
                sock.close()
                raise
            listeners.append(TunedListener(trio.SocketListener(sock), opts))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
