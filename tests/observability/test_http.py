"""The metrics and health endpoint, over real loopback sockets."""

from __future__ import annotations

import contextlib
import json
import socket
from functools import partial

import h11
import pytest
import trio
import trio.testing

from gateway.config import Address, ClientConfig, MetricsSettings
from gateway.edges.client_gateway import ClientGateway
from gateway.observability.http import HttpEndpoint, HttpLimits, serve_http, start_http
from gateway.observability.metrics import GatewayMetrics, UpstreamCheck

from ..pkitools import PKI

LOOPBACK = "127.0.0.1"


async def request(address: Address, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    if not data:
        return 0, {}, b""  # closed unanswered
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


async def get(
    address: Address, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    return await request(address, raw.encode())


def closed_port() -> Address:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return Address(LOOPBACK, sock.getsockname()[1])


def closed(metrics: GatewayMetrics, reason: str) -> float | None:
    labels = {"role": metrics.role, "reason": reason}
    return metrics.registry.get_sample_value("usbip_gateway_http_connections_closed_total", labels)


async def start(nursery: trio.Nursery, metrics: GatewayMetrics) -> Address:
    await nursery.start(serve_http, metrics, Address(LOOPBACK, 0))
    return metrics.http_addresses[0]


async def test_client_gateway_serves_its_endpoint_when_configured(
    pki: PKI, nursery: trio.Nursery
) -> None:
    config = ClientConfig(
        tls=pki.client_tls(),
        server=closed_port(),
        server_name="localhost",
        listen=(Address(LOOPBACK, 0),),
        metrics=MetricsSettings(listen=Address(LOOPBACK, 0)),
    )
    gateway = ClientGateway(config)
    listeners = await nursery.start(gateway.serve)
    address = gateway.metrics.http_addresses[0]
    status, _, body = await get(address, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert (await get(address, "/readyz"))[0] == 200

    # A usbip client whose server gateway is unreachable: counted, and its session listed
    # while it lasts.
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    assert await stream.receive_some(10) == b""  # closed once the connect failed
    await stream.aclose()
    status, headers, body = await get(address, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'usbip_gateway_build_info{device_label="none"' in text
    assert 'usbip_gateway_upstream_connect_failures_total{role="client"} 1.0' in text
    assert 'usbip_gateway_sessions_total{outcome="upstream_unreachable",role="client"} 1.0' in text
    status, headers, body = await get(address, "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["role"] == "client"


async def test_status_lists_sessions_with_percentiles(nursery: trio.Nursery) -> None:
    from .helpers import Wire  # noqa: PLC0415

    metrics = GatewayMetrics("server")
    wire = Wire(metrics)
    wire.import_device()
    for i in range(100):
        seq = wire.seqnum()
        wire.submit(seq, 1, 1, 512, now=float(i))  # type: ignore[arg-type]
        wire.complete(seq, now=i + (0.001 if i < 98 else 0.1), data=bytes(512))
    wire.submit(wire.seqnum(), 1, 1, 512, now=200.0)  # type: ignore[arg-type]
    address = await start(nursery, metrics)
    status, _, body = await get(address, "/status")
    assert status == 200
    (session,) = json.loads(body)["sessions"]
    assert session["identity"] == "spiffe://test/client"
    assert session["busid"] == "1-1.4"
    assert session["request"] == "import"
    assert session["urbs"] == 102
    assert session["in_flight"] == 1
    assert session["rtt_samples"] == 101
    assert session["rtt_p50_seconds"] == pytest.approx(0.001, rel=0.2)
    assert session["rtt_p99_seconds"] == pytest.approx(0.1, rel=0.2)
    assert session["bytes_from_server"] > 100 * 512


async def test_readiness_follows_usbipd(nursery: trio.Nursery) -> None:
    listener = trio.socket.socket()
    await listener.bind((LOOPBACK, 0))
    listener.listen()
    usbipd = Address(LOOPBACK, listener.getsockname()[1])
    metrics = GatewayMetrics("server", MetricsSettings(upstream_check_interval=30), upstream=usbipd)
    address = await start(nursery, metrics)
    status, _, body = await get(address, "/readyz")
    assert (status, body) == (503, b"not listening yet\n")
    metrics.listening = True
    assert (await get(address, "/readyz"))[0] == 200
    assert metrics.registry.get_sample_value("usbip_gateway_upstream_up", {"role": "server"}) == 1
    listener.close()
    # Reused until the interval passes; a failed connection upstream updates it at once.
    assert (await get(address, "/readyz"))[0] == 200
    metrics.upstream = UpstreamCheck(closed_port(), 30, 1.0)
    status, _, body = await get(address, "/readyz")
    assert status == 503
    assert b"unreachable" in body
    assert metrics.registry.get_sample_value("usbip_gateway_upstream_up", {"role": "server"}) == 0
    _, _, text = await get(address, "/metrics")
    assert b'usbip_gateway_upstream_up{role="server"} 0.0' in text


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
        (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
        ),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde", 405),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 requires Host
        (b"GET /metrics\r\n\r\n", 400),
        (b"\xff\xfe / HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
    ids=[
        "unknown-path",
        "post",
        "post-with-body",
        "no-host",
        "http-0.9",
        "not-ascii",
        "head-too-large",
    ],
)
async def test_bad_requests(nursery: trio.Nursery, raw: bytes, status: int) -> None:
    address = await start(nursery, GatewayMetrics("client"))
    try:
        got = (await request(address, raw))[0]
    except trio.BrokenResourceError:
        pytest.fail("the server should answer before closing")
    assert got == status


async def test_head_has_no_body(nursery: trio.Nursery) -> None:
    address = await start(nursery, GatewayMetrics("client"))
    status, headers, body = await get(address, "/healthz", method="HEAD")
    assert (status, headers["content-length"], body) == (200, "3", b"")


async def test_a_slow_request_head_gets_408(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    metrics = GatewayMetrics("client")
    address = await start(nursery, metrics)
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        started = trio.current_time()
        with trio.fail_after(HttpLimits().head_timeout * 2):
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - started >= HttpLimits().head_timeout
    assert closed(metrics, "head_timeout") == 1


async def test_an_idle_connection_is_closed_after_the_configured_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    metrics = GatewayMetrics("server", MetricsSettings(idle_timeout=2.0))
    address = await start(nursery, metrics)
    stream = await trio.open_tcp_stream(address.host, address.port)
    started = trio.current_time()
    with trio.fail_after(3.0):
        assert await stream.receive_some(100) == b""  # closed unanswered
    assert trio.current_time() - started >= 2.0
    await stream.aclose()
    assert closed(metrics, "idle_timeout") == 1


async def test_the_oldest_waiting_connection_makes_room(nursery: trio.Nursery) -> None:
    metrics = GatewayMetrics("client")
    await nursery.start(
        partial(serve_http, metrics, Address(LOOPBACK, 0), limits=HttpLimits(max_connections=1))
    )
    address = metrics.http_addresses[0]
    first = await trio.open_tcp_stream(address.host, address.port)
    await first.send_all(b"GET /healthz HTTP/1.1\r\n")  # holds the only slot, head unfinished
    status, _, body = await get(address, "/healthz")
    assert (status, body) == (200, b"ok\n")
    with contextlib.suppress(trio.BrokenResourceError):  # a reset or a FIN: closed either way
        assert await first.receive_some(100) == b""
    await first.aclose()
    assert closed(metrics, "evicted") == 1


async def test_a_closing_connection_made_to_give_way_is_counted_once(
    nursery: trio.Nursery,
) -> None:
    metrics = GatewayMetrics("client")
    await nursery.start(
        partial(serve_http, metrics, Address(LOOPBACK, 0), limits=HttpLimits(max_connections=1))
    )
    address = metrics.http_addresses[0]
    first = await trio.open_tcp_stream(address.host, address.port)
    await first.send_all(b"GET /metrics\r\n\r\n")
    assert (await first.receive_some(100)).startswith(b"HTTP/1.1 400 ")  # then it lingers
    assert (await get(address, "/healthz"))[0] == 200  # the lingering one gave way
    await first.aclose()
    assert (closed(metrics, "bad_request"), closed(metrics, "evicted")) == (1, 0)


async def test_healthz_is_served_past_many_silent_connections(nursery: trio.Nursery) -> None:
    metrics = GatewayMetrics("client")
    address = await start(nursery, metrics)
    silent = [await trio.open_tcp_stream(address.host, address.port) for _ in range(100)]
    try:
        with trio.fail_after(10):  # a bound in case of a hang, not a synchronisation
            status, _, body = await get(address, "/healthz")
    except trio.BrokenResourceError:
        pytest.fail("/healthz refused while silent connections hold the table")
    assert (status, body) == (200, b"ok\n")
    for stream in silent:
        await stream.aclose()
    # Every connection past the limit made room by closing an older, waiting one.
    assert closed(metrics, "evicted") == 100 + 1 - HttpLimits().max_connections


async def test_keep_alive_serves_a_bounded_number_of_requests(nursery: trio.Nursery) -> None:
    metrics = GatewayMetrics("client")
    await nursery.start(
        partial(serve_http, metrics, Address(LOOPBACK, 0), limits=HttpLimits(max_requests=3))
    )
    address = metrics.http_addresses[0]
    client = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(address.host, address.port)
    answers: list[tuple[int, bool]] = []
    async with stream:
        for method in ("GET", "HEAD", "GET"):
            request = h11.Request(method=method, target="/healthz", headers=[("Host", "x")])
            await stream.send_all(
                (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
            )
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    answers.append((event.status_code, (b"connection", b"close") in event.headers))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert body == (b"" if method == "HEAD" else b"ok\n")
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
        assert await stream.receive_some(100) == b""  # closed after the third
    assert answers == [(200, False), (200, False), (200, True)]


async def test_an_answer_the_client_does_not_read_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = GatewayMetrics("client")
    endpoint = HttpEndpoint(metrics, status=True, limits=HttpLimits(write_timeout=3.0))
    client, server = trio.testing.lockstep_stream_pair()  # no buffer: a send waits for a read
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.handle, server)
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        started = trio.current_time()
    # handle() returned: the connection was given up, after the write timeout.
    assert trio.current_time() - started >= 3.0
    assert closed(metrics, "write_timeout") == 1
    assert len(endpoint.table) == 0


async def test_status_can_be_left_off_the_metrics_endpoint(nursery: trio.Nursery) -> None:
    settings = MetricsSettings(
        listen=Address(LOOPBACK, 0), status=False, status_listen=Address(LOOPBACK, 0)
    )
    metrics = GatewayMetrics("server", settings)
    await start_http(nursery, metrics)
    public, private = metrics.http_addresses
    assert (await get(public, "/metrics"))[0] == 200
    assert (await get(public, "/healthz"))[0] == 200
    status, _, body = await get(public, "/status")
    assert status == 404
    assert b"/status" not in body
    status, _, body = await get(private, "/status")
    assert status == 200
    assert json.loads(body)["role"] == "server"
