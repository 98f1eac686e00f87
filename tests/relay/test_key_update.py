"""A TLS 1.3 peer that sends KeyUpdate messages in the middle of a relayed session.

Python's `ssl` has no way to send one, so the peer is OpenSSL's own `s_client`: a line
"K" on its standard input sends a KeyUpdate that asks for ours in return, "k" one that
does not. The request is read by the relay's reader thread and answered by OpenSSL on
the next write, from the writer thread: the per-connection lock keeps the two from using
the TLS object at once. The session goes on, byte for byte, both ways.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from gateway.accounting.outcome import OPEN, Outcome, OutcomeKind
from gateway.accounting.session import Session
from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Role,
    Splice,
)
from gateway.relay.pumps import relay
from gateway.transport.tls import handshake, server_context
from gateway.transport.tls_stream import TlsStream

from ..pkitools import PKI
from ..protocol.helpers import device, enumeration_steps
from .test_thread_pumps import socket_streams

INFO = device()
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


class SClient:
    """`openssl s_client` as the TLS peer: stdin is sent, stdout is what it received."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.received = bytearray()
        self.log = bytearray()

    async def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(data)

    async def receive_exactly(self, size: int) -> bytes:
        assert self.process.stdout is not None
        while len(self.received) < size:
            data = await self.process.stdout.receive_some()
            assert data, f"s_client ended: {self.log.decode(errors='replace')}"
            self.received += data
        out = bytes(self.received[:size])
        del self.received[:size]
        return out

    async def key_update(self, letter: bytes) -> None:
        """Send "K" or "k" alone, and wait until s_client says it sent the KeyUpdate
        (so that the next bytes are not read as part of the command line)."""
        assert self.process.stderr is not None
        await self.send(letter + b"\n")
        while self.log.count(b"KEYUPDATE") < self.key_updates + 1:
            data = await self.process.stderr.receive_some()
            assert data, f"s_client ended: {self.log.decode(errors='replace')}"
            self.log += data
        self.key_updates += 1

    key_updates = 0


async def test_a_peer_key_update_mid_session_keeps_the_session(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    assert OPENSSL is not None
    process = await trio.lowlevel.open_process(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-tls1_3",
            "-brief",
            "-cert",
            str(pki.client_cert),
            "-key",
            str(pki.client_key),
            "-CAfile",
            str(pki.ca_pem),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peer = SClient(process)
    tcp = await listener.accept()
    await listener.aclose()
    tls = TlsStream.over(
        tcp, server_context(pki.server_cert, pki.server_key, pki.ca_pem), server_side=True
    )
    await handshake(tls, 10.0)
    relay_server, usbipd = await socket_streams()
    server = Connection(Role.SERVER)
    session = Session("server", "s_client", "127.0.0.1", time.time())
    ended = trio.Event()

    async def run() -> None:
        await relay(Splice(), tls, relay_server, session)
        ended.set()

    async def usbipd_receives(expected: bytes) -> None:
        received = b""
        while len(received) < len(expected):
            data = await usbipd.receive_some(1 << 16)
            assert data
            received += data
        assert received == expected
        server.receive_data(received)
        while server.next_event() is not NEED_DATA:
            pass

    nursery.start_soon(run)
    with trio.fail_after(20):
        await peer.key_update(b"k")  # before any data
        request = OpRequestImport(INFO.busid).encode()
        await peer.send(request)
        await usbipd_receives(request)
        reply = server.send(OpReplyImport(OpStatus.OK, INFO))
        await usbipd.send_all(reply)
        assert await peer.receive_exactly(len(reply)) == reply
        for n, (sender, event) in enumerate(enumeration_steps(INFO.devid)):
            if n == 1:
                # Asks for ours: read in one thread, answered from the other.
                await peer.key_update(b"K")
            if sender is Role.CLIENT:
                assert isinstance(event, CmdSubmit)
                await peer.send(event.encode())
                await usbipd_receives(event.encode())
            else:
                wire = server.send(event)
                await usbipd.send_all(wire)
                assert await peer.receive_exactly(len(wire)) == wire
        await peer.key_update(b"K")
        assert session.outcome == OPEN
        # s_client ends at the end of its input, with close_notify.
        assert process.stdin is not None
        await process.stdin.aclose()
        await ended.wait()
        assert await process.wait() == 0
    assert session.outcome == Outcome(OutcomeKind.CLOSED, "closed by client")
    assert session.urbs_completed == 2
    assert peer.key_updates == 3
    await usbipd.aclose()
    for pipe in (process.stdout, process.stderr):
        assert pipe is not None
        await pipe.aclose()
