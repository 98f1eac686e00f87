"""Printable socket addresses for logs and session records.

`Address` prints itself (IPv6 in brackets); everything here goes through it, so a host
and port read the same wherever they are shown.
"""

from __future__ import annotations

import trio

from gateway.config import Address
from gateway.transport.sockets import TunedListener


def local_address(listener: trio.SocketListener | TunedListener) -> Address:
    """Where `listener` is bound (the port the system chose, when it was 0)."""
    host, port = listener.socket.getsockname()[:2]
    return Address(host, port)


def local_name(listener: trio.SocketListener | TunedListener) -> str:
    return str(local_address(listener))


def peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return str(Address(host, port))
