"""Operational properties of the gateway pair: idle sessions, slow readers, floods, expiry."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.demo import Stack, start_stack
from gateway.pki.ca import Issued, issue_client_cert, write_issued
from gateway.protocol import CmdSubmit, Direction
from gateway.transport.tls import client_context
from gateway.usbip.importer import import_device, list_devices

from .pkitools import PKI


async def _stack(pki: PKI, nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery, pki.server_tls(), pki.client_tls())


async def test_an_idle_session_is_not_killed(
    pki: PKI, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    # USB devices sit idle for hours: no idle timeout on either gateway by default.
    # (Virtual time that moves only here: the relay threads' work takes none of it.)
    stack = await _stack(pki, nursery)
    client = stack.client_address
    device = await import_device(await trio.open_tcp_stream(client.host, client.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        mock_clock.jump(6 * 3600)  # six hours of virtual time with nothing on the wire
        await trio.testing.wait_all_tasks_blocked()
        assert not device.closed.is_set()
        assert len(stack.server.sessions) == 1
        assert (await device.submit(1, Direction.OUT, data=b"morning")).status == 0
        assert (await device.submit(1, Direction.IN, length=7)).data == b"morning"
        await device.aclose()


async def test_a_slow_reader_holds_back_the_device_instead_of_filling_memory(
    pki: PKI, nursery: trio.Nursery
) -> None:
    stack = await _stack(pki, nursery)
    client = stack.client_address
    # A raw client that asks for 64 MiB from the source/sink and then reads nothing.
    sock = socket.create_connection((client.host, client.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    # Imported and enumerated (the gateways learn the endpoints); then raw bytes only.
    devid = (await import_device(stream, "1-1")).device.devid
    size, count = 1024 * 1024, 64
    cmds = b"".join(
        CmdSubmit(seqnum=i + 100, devid=devid, direction=Direction.IN, ep=1,
                  transfer_buffer_length=size).encode()
        for i in range(count)
    )  # fmt: skip
    await stream.send_all(cmds)
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)
    # Everything along the path stops once the slow reader's buffers are full: the
    # device has produced a bounded amount, far from the 64 MiB asked for.
    stalled = stack.sim.bytes_sent
    print(f"asked for 64 MiB, the device produced {stalled / 2**20:.1f} MiB before stalling")
    assert stalled < 24 * 1024 * 1024, stalled
    # Reading on lets every byte through, none lost.
    received = 0
    expected = count * (48 + size)
    with trio.fail_after(60):
        while received < expected:
            received += len(await stream.receive_some(1024 * 1024))
    assert received == expected
    await stream.aclose()


async def test_hundreds_of_connections_against_the_limit(pki: PKI, nursery: trio.Nursery) -> None:
    stack = await _stack(pki, nursery)
    # Silent connections wait in the handshake pool, whatever max_connections is.
    stack.server.acceptor.max_handshakes = 64
    stack.server.acceptor.max_handshakes_per_source = 64
    address = stack.server_address
    flood = [await trio.open_tcp_stream(address.host, address.port) for _ in range(500)]
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert stack.server.acceptor.active == 64
    assert stack.server.acceptor.handshaking == 64
    assert stack.server.acceptor.refused == 500 - 64
    for stream in flood:
        await stream.aclose()
    await stack.server.wait_idle()
    # The flood leaves nothing behind: a real client is served at once.
    devices = await list_devices(
        await trio.open_tcp_stream(stack.client_address.host, stack.client_address.port)
    )
    assert len(devices) == 3


async def test_an_expired_client_certificate_is_refused(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    stack = await _stack(pki, nursery)
    ca = Issued(
        x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes()),
        serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None),  # type: ignore[arg-type]
    )
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = issue_client_cert(ca, common_name="old", days=1, not_before=long_ago)
    cert, key = tmp_path / "old.pem", tmp_path / "old.key"
    write_issued(expired, cert, key)
    tcp = await trio.open_tcp_stream(stack.server_address.host, stack.server_address.port)
    stream = trio.SSLStream(tcp, client_context(cert, key, pki.ca_pem), server_hostname="localhost")
    await stream.do_handshake()  # TLS 1.3: the client learns of it on its first read
    try:
        await stream.send_all(b"\x01\x11\x80\x05\x00\x00\x00\x00")
        assert await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        pass
    await trio.aclose_forcefully(stream)
    await stack.server.wait_idle()
    text = stack.server.metrics.exposition().decode()
    assert 'reason="certificate_expired"' in text
    line = next(ln for ln in text.splitlines() if 'reason="certificate_expired"' in ln)
    assert line.endswith(" 1.0")
    assert stack.sim.connections_accepted == 0
