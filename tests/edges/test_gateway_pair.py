"""The gateway pair on loopback: simulator <- server gateway <=mTLS=> client gateway <- client."""

from __future__ import annotations

import json
import logging
import os
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from gateway.config import Address, TLSSettings
from gateway.demo import Stack, self_check, start_stack
from gateway.observability.endpoints import respond
from gateway.protocol import Direction, OpStatus
from gateway.transport.tls import client_context
from gateway.usbip.importer import ImportRefused, import_device, list_devices

from ..pkitools import PKI, make_pki, write_leaf


@pytest.fixture
async def stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def _connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def test_list_import_bulk_and_unlink_through_the_pair(stack: Stack) -> None:
    report = await self_check(stack.client_address)
    assert report[0].startswith("listed 3 devices")
    assert "1-1 (0525:a4a0)" in report[0]
    assert "identical" in report[2]
    assert "-ECONNRESET" in report[3]
    # One usbipd connection per client connection: the list, then the import.
    assert stack.sim.connections_accepted == 2
    assert stack.sim.imports == 1


@pytest.mark.parametrize("size", [1, 512, 65536, 1024 * 1024])
async def test_bulk_data_round_trips_byte_for_byte(stack: Stack, size: int) -> None:
    device = await import_device(await _connect(stack.client_address), "1-2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        payload = os.urandom(size)
        sent = await device.submit(1, Direction.OUT, data=payload)
        assert sent.status == 0
        assert sent.ret is not None
        assert sent.ret.actual_length == size
        received = bytearray()
        while len(received) < size:
            back = await device.submit(1, Direction.IN, length=size - len(received))
            assert back.status == 0
            received += back.data
        assert bytes(received) == payload
        await device.aclose()


async def test_many_urbs_in_flight_complete_by_seqnum(stack: Stack) -> None:
    device = await import_device(await _connect(stack.client_address), "1-1")
    results: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        async with trio.open_nursery() as urbs:
            for i in range(32):

                async def read(i: int = i) -> None:
                    done = await device.submit(1, Direction.IN, length=4096 + i)
                    results[i] = done.data

                urbs.start_soon(read)
        await device.aclose()
    # Source/sink pattern 0: zeros, each URB exactly as long as it asked for.
    assert {i: len(d) for i, d in results.items()} == {i: 4096 + i for i in range(32)}
    assert all(d == bytes(len(d)) for d in results.values())


async def test_device_in_use_and_unknown_device(stack: Stack) -> None:
    first = await import_device(await _connect(stack.client_address), "1-1")
    with pytest.raises(ImportRefused) as busy:
        await import_device(await _connect(stack.client_address), "1-1")
    assert busy.value.status == OpStatus.DEV_BUSY
    # In use, so the list leaves it out, as current usbipd does.
    listed = await list_devices(await _connect(stack.client_address))
    assert [d.info.busid for d in listed] == ["1-2", "1-3"]
    with pytest.raises(ImportRefused) as unknown:
        await import_device(await _connect(stack.client_address), "9-9")
    assert unknown.value.status == OpStatus.NODEV
    await first.aclose()


async def test_status_names_the_imported_device_on_both_gateways(stack: Stack) -> None:
    device = await import_device(await _connect(stack.client_address), "1-2")
    for gateway in (stack.server, stack.client):
        _, _, body = await respond(gateway.metrics, "GET", "/status")
        (session,) = json.loads(body)["sessions"]
        assert (session["request"], session["busid"], session["device"]) == (
            "import",
            "1-2",
            "1-2",
        )
    await device.aclose()


async def _tls_to_server(stack: Stack, context: ssl.SSLContext) -> bytes:
    """Speak USB/IP over TLS straight to the server gateway; return what comes back."""
    tcp = await _connect(stack.server_address)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    received = b""
    try:
        await stream.send_all(b"\x01\x11\x80\x05\x00\x00\x00\x00")  # OP_REQ_DEVLIST
        while chunk := await stream.receive_some(65536):
            received += chunk
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return received


async def test_client_without_certificate_is_refused_before_usbipd(
    stack: Stack, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with caplog.at_level(logging.WARNING, "gateway.edges.server_gateway"):
        assert await _tls_to_server(stack, context) == b""
    assert stack.sim.connections_accepted == 0
    assert "no_certificate" in caplog.text


async def test_client_from_another_ca_is_refused_before_usbipd(
    stack: Stack, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = trustme.CA()
    cert, key = write_leaf(other.issue_cert("intruder.test"), tmp_path, "intruder")
    context = client_context(cert, key, pki.ca_pem)
    with caplog.at_level(logging.WARNING, "gateway.edges.server_gateway"):
        assert await _tls_to_server(stack, context) == b""
    assert stack.sim.connections_accepted == 0
    assert "unknown_ca" in caplog.text


async def test_valid_client_certificate_reaches_usbipd(stack: Stack, pki: PKI) -> None:
    # The control for the two refusals above: the same path with the right certificate.
    context = client_context(pki.client_cert, pki.client_key, pki.ca_pem)
    reply = await _tls_to_server(stack, context)
    assert reply[:4] == b"\x01\x11\x00\x05"  # OP_REP_DEVLIST
    assert stack.sim.connections_accepted == 1


async def test_client_gateway_refuses_a_server_with_the_wrong_name(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A server gateway whose certificate is valid but names another host.
    impostor = make_pki(tmp_path / "impostor")
    leaf = pki.ca.issue_cert("other-host.test")
    cert, key = write_leaf(leaf, tmp_path, "other-host")
    stack = await start_stack(nursery, TLSSettings(cert, key, pki.ca_pem), pki.client_tls())
    assert impostor.ca_pem.exists()
    with pytest.raises((trio.BrokenResourceError, ConnectionError, EOFError)):
        await list_devices(await _connect(stack.client_address))
    assert stack.sim.connections_accepted == 0


async def test_garbage_from_a_trusted_client_never_reaches_usbipd(stack: Stack, pki: PKI) -> None:
    context = client_context(pki.client_cert, pki.client_key, pki.ca_pem)
    tcp = await _connect(stack.server_address)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    await stream.send_all(
        b"\x01\x11\x80\x03\x00\x00\x00\x00" + b"../../etc/passwd".ljust(32, b"\0")
    )
    assert await stream.receive_some(100) == b""  # closed without an answer
    await trio.aclose_forcefully(stream)
    assert stack.sim.connections_accepted == 0
