"""Raw USB/IP over mutual TLS straight to a server gateway, as any TLS client could."""

from __future__ import annotations

import trio

from gateway.config import Address, TLSSettings
from gateway.transport.tls import client_context

OP_REQ_DEVLIST = b"\x01\x11\x80\x05\x00\x00\x00\x00"


def op_req_import(busid: str) -> bytes:
    return b"\x01\x11\x80\x03\x00\x00\x00\x00" + busid.encode().ljust(32, b"\0")


async def exchange(
    address: Address, tls: TLSSettings, request: bytes, *, until: int | None = None
) -> bytes:
    """Send `request`; what comes back until the gateway closes, or `until` bytes."""
    tcp = await trio.open_tcp_stream(address.host, address.port)
    stream = trio.SSLStream(
        tcp, client_context(tls.cert, tls.key, tls.ca), server_hostname="localhost"
    )
    received = b""
    try:
        await stream.send_all(request)
        while (until is None or len(received) < until) and (
            chunk := await stream.receive_some(65536)
        ):
            received += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return received
