"""Hostile clients with a valid certificate, against the real server gateway.

Each case ends with a clean close, a log line and a metric; not one byte of the bad
input reaches usbipd (the simulator counts what it receives); a healthy session that
runs alongside keeps working.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import Stack, start_stack
from gateway.protocol import CmdSubmit, Direction, OpRequestDevlist, OpRequestImport, RetSubmit
from gateway.transport.tls import client_context
from gateway.usbip.importer import import_device

from ..pkitools import PKI

OP = struct.Struct(">HHI")
IMPORT_11 = OpRequestImport("1-1").encode()


def _cmd(devid: int, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "seqnum": 7, "devid": devid, "direction": Direction.IN, "ep": 1,
        "transfer_buffer_length": 512,
    }  # fmt: skip
    fields.update(kw)
    return CmdSubmit(**fields).encode()  # type: ignore[arg-type]


# Each case: (the op request or prefix, the hostile bytes after the op reply, or None
# when the hostile bytes are the request itself).
OP_CASES: dict[str, bytes] = {
    "busid without NUL": OP.pack(0x0111, 0x8003, 0) + b"1" * 32,
    "busid with path tricks": OP.pack(0x0111, 0x8003, 0) + b"../../1-1".ljust(32, b"\0"),
    "unknown op code (DEVINFO)": OP.pack(0x0111, 0x8002, 0) + bytes(32),
    "wrong version": OP.pack(0x0110, 0x8005, 0),
    "request with a status": OP.pack(0x0111, 0x8005, 3),
    "data after a DEVLIST": OpRequestDevlist().encode() + b"more",
    "URB before the IMPORT reply": IMPORT_11 + _cmd(0x10002),
    "a URB with no import": _cmd(0x10002),
}

URB_CASES: dict[str, Callable[[int], bytes]] = {
    "URB for a devid not imported": lambda devid: _cmd(devid + 1),
    "RET/CMD confusion": lambda devid: RetSubmit(seqnum=7).encode(),
    "transfer length over the cap": lambda devid: _cmd(devid, transfer_buffer_length=2**24 + 1),
    "negative transfer length": lambda devid: (
        _cmd(devid)[:24] + struct.pack(">i", -1) + _cmd(devid)[28:]
    ),
    "1025 ISO packets": lambda devid: _cmd(devid)[:32] + struct.pack(">I", 1025) + _cmd(devid)[36:],
    "unknown command": lambda devid: struct.pack(">I", 9) + _cmd(devid)[4:],
}


@pytest.fixture
async def stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def _tls(stack: Stack, pki: PKI) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(stack.server_address.host, stack.server_address.port)
    context = client_context(pki.client_cert, pki.client_key, pki.ca_pem)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def _read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def _metric(stack: Stack, name: str, **labels: str) -> float:
    """A sample of the server gateway's exposition, as Prometheus would read it."""
    text = stack.server.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def _protocol_errors(stack: Stack) -> float:
    return _metric(stack, "usbip_gateway_protocol_errors_total", side="client")


async def _healthy_session_still_works(stack: Stack) -> None:
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        assert (await device.submit(1, Direction.OUT, data=b"healthy")).status == 0
        back = await device.submit(1, Direction.IN, length=7)
        assert back.data == b"healthy"
        await device.aclose()


@pytest.mark.parametrize("case", list(OP_CASES))
async def test_hostile_op_phase(
    stack: Stack, pki: PKI, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    received = stack.sim.bytes_received
    errors = _protocol_errors(stack)
    stream = await _tls(stack, pki)
    with caplog.at_level(logging.INFO, "gateway.edges.server_gateway"):
        await stream.send_all(OP_CASES[case])
        assert await _read_to_end(stream) == b""  # closed, not answered
        await stream.aclose()
        await stack.server.wait_idle()
    assert "protocol error from client" in caplog.text
    assert _protocol_errors(stack) == errors + 1
    assert stack.sim.bytes_received == received  # nothing reached usbipd
    await _healthy_session_still_works(stack)


@pytest.mark.parametrize("case", list(URB_CASES))
async def test_hostile_urb_phase(
    stack: Stack, pki: PKI, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream = await _tls(stack, pki)
    await stream.send_all(IMPORT_11)
    reply = b""
    while len(reply) < 320:
        reply += await stream.receive_some(320 - len(reply))
    busnum, devnum = struct.unpack_from(">II", reply, 8 + 288)
    received = stack.sim.bytes_received  # the import reached usbipd legitimately
    errors = _protocol_errors(stack)
    with caplog.at_level(logging.INFO, "gateway.edges.server_gateway"):
        await stream.send_all(URB_CASES[case]((busnum << 16) | devnum))
        assert await _read_to_end(stream) == b""
        await stream.aclose()
        await stack.server.wait_idle()
    assert "protocol error from client" in caplog.text
    assert _protocol_errors(stack) == errors + 1
    assert stack.sim.bytes_received == received
    await _healthy_session_still_works(stack)


async def test_slowloris_handshake_times_out(pki: PKI, nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery, pki.server_tls(), pki.client_tls())
    stack.server.config = replace(stack.server.config, handshake_timeout=0.3)
    tcp = await trio.open_tcp_stream(stack.server_address.host, stack.server_address.port)
    await tcp.send_all(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    assert await _read_to_end(tcp) == b""
    await tcp.aclose()
    await stack.server.wait_idle()
    assert _metric(stack, "usbip_gateway_tls_handshake_failures_total", reason="timeout") == 1
    assert stack.sim.connections_accepted == 0
    await _healthy_session_still_works(stack)


async def test_tls12_only_client_is_refused_when_13_is_required(stack: Stack, pki: PKI) -> None:
    context = client_context(
        pki.client_cert, pki.client_key, pki.ca_pem, min_version=ssl.TLSVersion.TLSv1_2
    )
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    tcp = await trio.open_tcp_stream(stack.server_address.host, stack.server_address.port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    with pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
    await trio.aclose_forcefully(stream)
    await stack.server.wait_idle()
    failures = "usbip_gateway_tls_handshake_failures_total"
    assert _metric(stack, failures, reason="protocol_version") == 1
    assert stack.sim.connections_accepted == 0
