"""A small HTTP/1.1 server in the gateway's own Trio loop: /metrics, /healthz, /readyz,
/status.

One request per connection (`Connection: close`), GET and HEAD only, a bounded request
head read within a timeout, a bounded number of connections at once. Nothing blocks
the relay: building /metrics is a bounded amount of in-process work.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gateway.config import Address

from .metrics import GatewayMetrics

log = logging.getLogger("gateway.http")

MAX_HEAD = 8 * 1024  # request line and headers
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
LINGER_TIMEOUT = 1.0  # after the response: at most this long ...
LINGER_BYTES = 64 * 1024  # ... reading at most this much of what the client still sends

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) > MAX_HEAD:
            raise _BadRequest(431)
        chunk = await stream.receive_some(MAX_HEAD)
        if not chunk:
            raise _BadRequest(400)
        buffer += chunk


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400)
    return parts[0], parts[1]


def _response(status: int, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


async def respond(metrics: GatewayMetrics, method: str, target: str) -> tuple[int, str, bytes]:
    """Status, content type and body for one request."""
    if method not in ("GET", "HEAD"):
        return 405, _TEXT, b"GET or HEAD only\n"
    path = target.split("?", 1)[0]
    if path == "/metrics":
        await metrics.check_upstream()  # keeps usbip_gateway_upstream_up current
        return 200, CONTENT_TYPE_PLAIN_0_0_4, metrics.exposition()
    if path == "/healthz":
        return 200, _TEXT, b"ok\n"
    if path == "/readyz":
        ready, why = await metrics.ready()
        return (200 if ready else 503), _TEXT, f"{why}\n".encode()
    if path == "/status":
        body = json.dumps(metrics.status(), indent=1).encode() + b"\n"
        return 200, _JSON, body
    return 404, _TEXT, b"not found: try /metrics, /healthz, /readyz, /status\n"


async def _handle(
    metrics: GatewayMetrics, slots: trio.Semaphore, stream: trio.SocketStream
) -> None:
    async with stream:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await _exchange(metrics, stream)
            await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            slots.release()


async def _linger(stream: trio.SocketStream) -> None:
    """Read what the client still sends before closing, so that closing with unread
    data does not reset the connection before the client has read the response."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_TIMEOUT):
        drained = 0
        while drained < LINGER_BYTES and (chunk := await stream.receive_some(MAX_HEAD)):
            drained += len(chunk)


async def _exchange(metrics: GatewayMetrics, stream: trio.SocketStream) -> None:
    method = ""
    try:
        with trio.fail_after(READ_TIMEOUT):
            head = await _read_head(stream)
        method, target = _request_line(head)
        status, content_type, body = await respond(metrics, method, target)
    except _BadRequest as exc:
        status, content_type, body = exc.status, _TEXT, b"bad request\n"
    except UnicodeDecodeError:
        status, content_type, body = 400, _TEXT, b"bad request\n"
    except trio.TooSlowError:
        status, content_type, body = 408, _TEXT, b"request timeout\n"
    with trio.fail_after(WRITE_TIMEOUT):
        await stream.send_all(_response(status, content_type, body, head=method == "HEAD"))


async def serve_http(
    metrics: GatewayMetrics,
    address: Address,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints on `address` until cancelled; `metrics.http_addresses` says
    where (useful with port 0)."""
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        metrics.http_addresses.append(Address(host, port))
        log.info("metrics and health on http://%s/metrics", Address(host, port))
    task_status.started(listeners)
    slots = trio.Semaphore(MAX_CONNECTIONS)
    handler: Any = partial(_handle, metrics, slots)
    await trio.serve_listeners(handler, listeners)
