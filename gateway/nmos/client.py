"""A small HTTP/1.1 client on h11 for the Node's own requests to a Registration API: one
request per connection, bounded in time and in the size of the answer."""

from __future__ import annotations

import json
from typing import Any

import h11
import trio

MAX_ANSWER = 1024 * 1024
RECEIVE_SIZE = 16 * 1024


class HttpFailed(Exception):
    """No answer: the connection failed, timed out or the answer was not HTTP."""


async def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    value: Any = None,
    *,
    timeout: float,
) -> tuple[int, bytes]:
    """Status and body of `method path` (with `value` as a JSON body, if not None)."""
    body = b"" if value is None else json.dumps(value).encode()
    headers = [("Host", f"{host}:{port}"), ("Connection", "close")]
    if value is not None:
        headers.append(("Content-Type", "application/json"))
    if value is not None or method in ("POST", "PUT", "PATCH"):
        headers.append(("Content-Length", str(len(body))))
    conn = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                out = conn.send(h11.Request(method=method, target=path, headers=headers))
                if body:
                    out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
                out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
                await stream.send_all(out)
                return await _answer(stream, conn)
    except trio.TooSlowError:
        raise HttpFailed(f"{method} {path}: no answer within {timeout:g}s") from None
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise HttpFailed(f"{method} {path}: {exc}") from None


async def _answer(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, bytes]:
    status = 0
    data = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            chunk = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(bytes(chunk))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > MAX_ANSWER:
                raise HttpFailed(f"answer over {MAX_ANSWER} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise HttpFailed("connection closed before an answer")
            return status, bytes(data)
