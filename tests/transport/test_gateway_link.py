"""Compression and MPTCP through the real gateway pair, and their config keys and flags."""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import zstandard

from gateway.accounting.session import Session
from gateway.cli import _overrides, build_parser
from gateway.config import (
    Address,
    CompressionSettings,
    ConfigError,
    TransportSettings,
    client_config,
    load,
    server_config,
)
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import CmdSubmit, Direction, OpRequestImport
from gateway.sim.server import SimServer, serve_sim
from gateway.transport import compression
from gateway.transport.sockets import IPPROTO_MPTCP
from gateway.transport.tls import ALPN_PLAIN, ALPN_ZSTD, client_context, negotiated_alpn
from gateway.usbip.importer import import_device

from .. import pkitools as pki_helpers
from ..pkitools import PKI
from .test_compression import text_like

ZSTD = CompressionSettings("zstd", 3)
OFF = CompressionSettings()


@dataclass
class Pair:
    sim: SimServer
    server: ServerGateway
    client: ClientGateway
    server_address: Address
    client_address: Address


def _bound(listeners: list[trio.SocketListener]) -> Address:
    host, port = listeners[0].socket.getsockname()[:2]
    return Address(host, port)


async def start_pair(
    nursery: trio.Nursery,
    pki: PKI,
    *,
    server: CompressionSettings = OFF,
    client: CompressionSettings = OFF,
    server_mptcp: bool = False,
    client_mptcp: bool = False,
) -> Pair:
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    server_gw = ServerGateway(
        pki_helpers.server_config(
            pki,
            Address(*sim.addresses[0]),
            compression=server,
            transport=TransportSettings(mptcp=server_mptcp),
        )
    )
    server_address = _bound(await nursery.start(server_gw.serve))
    client_gw = ClientGateway(
        pki_helpers.client_config(
            pki,
            server_address,
            compression=client,
            transport=TransportSettings(mptcp=client_mptcp),
        )
    )
    client_address = _bound(await nursery.start(client_gw.serve))
    return Pair(sim, server_gw, client_gw, server_address, client_address)


def _only_session(sessions: dict[int, Session]) -> Session:
    imports = [s for s in sessions.values() if s.request == "import"]
    assert len(imports) == 1, sessions
    return imports[0]


async def _write_and_read_back(pair: Pair, payloads: list[bytes]) -> tuple[Session, Session]:
    """Each payload out to the loopback device and back; the sessions while attached."""
    address = pair.client_address
    device = await import_device(await trio.open_tcp_stream(address.host, address.port), "1-2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        for payload in payloads:
            sent = await device.submit(1, Direction.OUT, data=payload)
            assert sent.status == 0
            back = bytearray()
            while len(back) < len(payload):
                got = await device.submit(1, Direction.IN, length=len(payload) - len(back))
                assert got.status == 0
                back += got.data
            assert bytes(back) == payload
        sessions = _only_session(pair.server.sessions), _only_session(pair.client.sessions)
        for gateway, session in zip((pair.server, pair.client), sessions, strict=True):
            (status,) = [s for s in gateway.metrics.status()["sessions"] if s["id"] == session.id]
            assert status["transport"] == session.transport
            assert status["compression"] == session.compression
        await device.aclose()
    return sessions


def _compressed_bytes(pair: Pair, operation: str, stage: str) -> float:
    total = 0.0
    for gateway in (pair.server, pair.client):
        value = gateway.metrics.registry.get_sample_value(
            f"usbip_gateway_compression_{stage}_bytes_total",
            {"role": gateway.metrics.role, "operation": operation},
        )
        total += value or 0.0
    return total


PAYLOADS = [text_like(64 * 1024), os.urandom(64 * 1024), bytes(4096), b"x"]


@pytest.mark.parametrize(
    ("server_on", "client_on", "negotiated"),
    [
        (True, False, "none"),
        (False, True, "none"),
        (True, True, "zstd"),
        (False, False, "none"),
    ],
)
async def test_mixed_versions_relay_byte_exact(
    pki: PKI, nursery: trio.Nursery, server_on: bool, client_on: bool, negotiated: str
) -> None:
    pair = await start_pair(
        nursery, pki, server=ZSTD if server_on else OFF, client=ZSTD if client_on else OFF
    )
    server_session, client_session = await _write_and_read_back(pair, PAYLOADS)
    assert server_session.compression == client_session.compression == negotiated
    assert server_session.transport == client_session.transport == "tcp"
    total_in = _compressed_bytes(pair, "compress", "input")
    if negotiated == "zstd":
        # Text and zeros shrink, random goes raw: fewer bytes on the wire than given.
        assert total_in > 2 * sum(len(p) for p in PAYLOADS)
        assert _compressed_bytes(pair, "compress", "output") < 0.8 * total_in
        assert _compressed_bytes(pair, "decompress", "output") == total_in
    else:
        assert total_in == 0


@pytest.mark.parametrize(
    ("server_on", "client_offer", "expected"),
    [
        (True, (ALPN_ZSTD, ALPN_PLAIN), ALPN_ZSTD),
        (True, (ALPN_PLAIN, ALPN_ZSTD), ALPN_ZSTD),  # the server's preference wins
        (True, (ALPN_PLAIN,), ALPN_PLAIN),
        (False, (ALPN_ZSTD, ALPN_PLAIN), ALPN_PLAIN),
    ],
)
async def test_alpn_negotiation_with_the_server_gateway(
    pki: PKI, nursery: trio.Nursery, server_on: bool, client_offer: tuple[str, ...], expected: str
) -> None:
    pair = await start_pair(nursery, pki, server=ZSTD if server_on else OFF)
    ctx = client_context(pki.client_cert, pki.client_key, pki.ca_pem, alpn=client_offer)
    tcp = await trio.open_tcp_stream(pair.server_address.host, pair.server_address.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    with trio.fail_after(10):
        await tls.do_handshake()
    assert negotiated_alpn(tls) == expected
    await trio.aclose_forcefully(tls)


def _mptcp_socket_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("server_mptcp", "client_mptcp"), [(True, True), (True, False), (False, True)]
)
async def test_session_reports_the_transport_really_used(
    pki: PKI, nursery: trio.Nursery, server_mptcp: bool, client_mptcp: bool
) -> None:
    """MPTCP only when both ends use it; an MPTCP listener accepts plain TCP clients."""
    pair = await start_pair(
        nursery,
        pki,
        server=ZSTD,
        client=ZSTD,
        server_mptcp=server_mptcp,
        client_mptcp=client_mptcp,
    )
    server_session, client_session = await _write_and_read_back(pair, PAYLOADS[:2])
    both = server_mptcp and client_mptcp and _mptcp_socket_available()
    expected = "mptcp" if both else "tcp"
    assert (server_session.transport, client_session.transport) == (expected, expected)
    assert server_session.compression == "zstd"


async def test_session_end_is_counted_by_transport(pki: PKI, nursery: trio.Nursery) -> None:
    pair = await start_pair(nursery, pki, server=ZSTD, client=ZSTD)
    await _write_and_read_back(pair, [b"abc"])
    with trio.fail_after(10):
        while pair.server.sessions or pair.client.sessions:
            await pair.server.wait_idle()
            await trio.testing.wait_all_tasks_blocked()
    for gateway in (pair.server, pair.client):
        assert (
            gateway.metrics.registry.get_sample_value(
                "usbip_gateway_sessions_by_transport_total",
                {"role": gateway.metrics.role, "transport": "tcp", "compression": "zstd"},
            )
            == 1
        )


async def test_a_hostile_zstd_chunk_ends_only_its_own_session(
    pki: PKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A trusted client's chunk over the limit, after a good import: the server gateway
    ends that session with a log line and a metric; an attached session goes on."""
    pair = await start_pair(nursery, pki, server=ZSTD, client=ZSTD)
    address = pair.client_address
    healthy = await import_device(await trio.open_tcp_stream(address.host, address.port), "1-2")
    nursery.start_soon(healthy.serve)

    ctx = client_context(pki.client_cert, pki.client_key, pki.ca_pem, alpn=(ALPN_ZSTD,))
    tcp = await trio.open_tcp_stream(pair.server_address.host, pair.server_address.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    hostile = compression.wrap(tls)
    received = pair.sim.bytes_received
    with caplog.at_level(logging.INFO, "gateway.edges.server_gateway"), trio.fail_after(10):
        await hostile.send_all(OpRequestImport("1-1").encode())
        reply = b""
        while len(reply) < 320:
            reply += await hostile.receive_some()
        assert reply[:8] == b"\x01\x11\x00\x03\x00\x00\x00\x00"  # OP_REP_IMPORT, OK
        received = pair.sim.bytes_received
        over = struct.pack(">BII", compression.ChunkType.ZSTD, 16, compression.MAX_CHUNK + 1)
        await tls.send_all(over + bytes(16))
        assert await hostile.receive_some() == b""  # closed, nothing answered
        while _sessions_ended(pair, "connection_lost") < 1:
            await trio.testing.wait_all_tasks_blocked()
    assert "plain length 1048577 exceeds the limit of 1048576" in caplog.text
    assert pair.sim.bytes_received == received  # nothing after the import reached usbipd
    await trio.aclose_forcefully(hostile)

    sent = await healthy.submit(1, Direction.OUT, data=b"still here")
    assert sent.status == 0
    assert (await healthy.submit(1, Direction.IN, length=10)).data == b"still here"
    await healthy.aclose()


async def test_a_chunk_at_the_limit_from_a_peer_reaches_usbipd(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A peer's own encoder may write chunks of up to 1 MiB (ours writes 64 KiB): the
    server gateway decodes one and forwards the URB it carries."""
    pair = await start_pair(nursery, pki, server=ZSTD, client=ZSTD)
    ctx = client_context(pki.client_cert, pki.client_key, pki.ca_pem, alpn=(ALPN_ZSTD,))
    tcp = await trio.open_tcp_stream(pair.server_address.host, pair.server_address.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    replies = compression.ZstdReceiveStream(tls)
    packer = zstandard.ZstdCompressor()  # its own defaults: no dictionary, level 3

    def chunk(payload: bytes) -> bytes:
        data = packer.compress(payload)
        return struct.pack(">BII", compression.ChunkType.ZSTD, len(data), len(payload)) + data

    async def read(size: int) -> bytes:
        got = b""
        while len(got) < size:
            data = await replies.receive_some(size - len(got))
            assert data, "the server gateway closed the session"
            got += data
        return got

    with trio.fail_after(10):
        await tls.send_all(chunk(OpRequestImport("1-1").encode()))
        busnum, devnum = struct.unpack_from(">II", await read(320), 8 + 288)
        devid = (busnum << 16) | devnum
        for seqnum, setup in enumerate(ENUMERATION, start=100):  # endpoints become known
            request = CmdSubmit(seqnum, devid, Direction(setup[0] >> 7), 0, setup[6], setup=setup)
            await tls.send_all(chunk(request.encode()))
            answer = await read(48)
            await read(struct.unpack_from(">i", answer, 24)[0] if setup[0] & 0x80 else 0)
        payload = bytes(compression.MAX_CHUNK)  # what the source/sink expects
        cmd = CmdSubmit(1, devid, Direction.OUT, 1, len(payload), data=payload)
        frame = cmd.encode()
        received = pair.sim.bytes_received
        await tls.send_all(chunk(frame[:48]) + chunk(frame[48:]))
        ret = await read(48)
    command, seqnum, _, _, _, status, actual = struct.unpack_from(">IIIIIiI", ret)
    assert (command, seqnum, status, actual) == (3, 1, 0, len(payload))  # RET_SUBMIT, OK
    assert pair.sim.bytes_received - received == len(frame)
    await trio.aclose_forcefully(tls)


# What usbcore sends first: the configuration descriptor (the source/sink's fits in
# 255 bytes), then SET_CONFIGURATION(1).
ENUMERATION = (
    struct.pack("<BBHHH", 0x80, 0x06, 0x0200, 0, 255),
    struct.pack("<BBHHH", 0x00, 0x09, 1, 0, 0),
)


def _sessions_ended(pair: Pair, outcome: str) -> float:
    value = pair.server.metrics.registry.get_sample_value(
        "usbip_gateway_sessions_total", {"role": "server", "outcome": outcome}
    )
    return value or 0.0


# ----------------------------------------------------------------- config and flags


def _tls_table(pki: PKI) -> dict[str, str]:
    return {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca_pem)}


def test_config_defaults_are_off(pki: PKI) -> None:
    config = server_config({"tls": _tls_table(pki)})
    assert config.compression == CompressionSettings("none", 3)
    assert not config.compression.enabled
    assert config.transport == TransportSettings(mptcp=False)


def test_config_keys_in_both_roles(pki: PKI) -> None:
    tables = {
        "tls": _tls_table(pki),
        "compression": {"algorithm": "zstd", "level": 9},
        "transport": {"mptcp": True},
    }
    server = server_config(tables)
    client = client_config({**tables, "client": {"server": "gw.example:3240"}})
    for config in (server, client):
        assert config.compression == CompressionSettings("zstd", 9)
        assert config.compression.enabled
        assert config.transport.mptcp


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"compression": {"algorithm": "lz4"}}, "compression.algorithm: 'lz4' is not one of"),
        ({"compression": {"level": 20}}, r"compression.level: 20 is outside 1\.\.19"),
        ({"compression": {"level": 0}}, r"compression.level: 0 is outside 1\.\.19"),
        ({"compression": {"level": "3"}}, "compression.level: must be an integer"),
        ({"compression": {"levle": 3}}, "compression.levle: unknown key"),
        ({"transport": {"mptcp": "yes"}}, "transport.mptcp: must be true or false"),
        ({"transport": {"multipath": True}}, "transport.multipath: unknown key"),
    ],
)
def test_config_errors_name_the_key(pki: PKI, section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        server_config({"tls": _tls_table(pki), **section})


def test_config_levels_match_the_codec() -> None:
    assert (compression.MIN_LEVEL, compression.MAX_LEVEL) == (1, 19)
    assert CompressionSettings().level == compression.DEFAULT_LEVEL


@pytest.mark.parametrize("role", ["server", "client"])
def test_flags_override_the_file(pki: PKI, tmp_path: Path, role: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca_pem}"\n'
        '[compression]\nalgorithm = "none"\nlevel = 5\n'
        + ('[client]\nserver = "gw.example:3240"\n' if role == "client" else "")
    )
    flags = ["--mptcp", "--compression", "zstd", "--compression-level", "7"]
    args = build_parser().parse_args([role, "--config", str(path), *flags])
    config = load(role, path, _overrides(role, args))  # type: ignore[arg-type]
    assert config.compression == CompressionSettings("zstd", 7)
    assert config.transport.mptcp
    unset = build_parser().parse_args([role, "--config", str(path)])
    config = load(role, path, _overrides(role, unset))  # type: ignore[arg-type]
    assert config.compression == CompressionSettings("none", 5)
    assert not config.transport.mptcp
