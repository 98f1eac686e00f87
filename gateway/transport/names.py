"""Printable socket addresses for logs and session records."""

from __future__ import annotations

from typing import Any

import trio

from gateway.transport.sockets import TunedListener


def format_sockaddr(sockaddr: Any) -> str:
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_name(listener: trio.SocketListener | TunedListener) -> str:
    return format_sockaddr(listener.socket.getsockname())


def peer_name(stream: trio.SocketStream) -> str:
    try:
        return format_sockaddr(stream.socket.getpeername())
    except OSError:
        return "unknown"
