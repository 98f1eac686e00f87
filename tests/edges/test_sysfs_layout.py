"""The server gateway frames URBs by the device's own sysfs, where usbip-host's devices are.

The simulator publishes what sysfs shows of a device bound to usbip-host (`descriptors`,
bus and device numbers, the active configuration, each interface's alt setting) and
keeps it current, as the kernel does; the server gateway's `policy.sysfs` points there.
A client speaks USB/IP over mutual TLS straight to the server gateway, byte for byte.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.config import Address, PolicySettings, ServerConfig
from gateway.edges.device_facts import SysfsLayout
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import (
    CmdSubmit,
    Direction,
    IsoPacket,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    RetSubmit,
)
from gateway.sim import SimServer, serve_sim
from gateway.sim.gadget_zero import SourceSink
from gateway.transport.tls import client_context

from ..pkitools import PKI
from ..protocol.helpers import config_descriptor, setup_packet

BUSID = "1-1"  # the Gadget Zero source/sink: bulk 0x81/0x01; alt 1 adds iso 0x82/0x02
_RET = struct.Struct(">IIIIIiiiIi8x")


@dataclass
class Rig:
    sim: SimServer
    server: ServerGateway
    address: Address
    sysfs: Path
    pki: PKI

    async def connect(self) -> trio.SSLStream[trio.SocketStream]:
        tcp = await trio.open_tcp_stream(self.address.host, self.address.port)
        context = client_context(self.pki.client_cert, self.pki.client_key, self.pki.ca_pem)
        return trio.SSLStream(tcp, context, server_hostname="localhost")

    async def imported(self) -> tuple[trio.SSLStream[trio.SocketStream], int]:
        stream = await self.connect()
        await stream.send_all(OpRequestImport(BUSID).encode())
        reply = await receive_exactly(stream, 320)
        assert reply[:8] == b"\x01\x11\x00\x03\x00\x00\x00\x00", reply[:8]
        busnum, devnum = struct.unpack_from(">II", reply, 8 + 288)
        return stream, busnum << 16 | devnum


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


async def closed(stream: trio.abc.ReceiveStream) -> bool:
    """The peer closed (or reset) the connection without sending anything more."""
    try:
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def answer(stream: trio.abc.Stream, cmd: CmdSubmit) -> RetSubmit:
    await stream.send_all(cmd.encode())
    head = await receive_exactly(stream, 48)
    assert len(head) == 48, "connection closed instead of an answer"
    _, seqnum, _, _, _, status, actual, start, np, errors = _RET.unpack(head)
    data = await receive_exactly(stream, actual) if cmd.direction is Direction.IN else b""
    descriptors = await receive_exactly(stream, 16 * np) if cmd.iso_packets else b""
    packets = tuple(IsoPacket(*struct.unpack_from(">IIii", descriptors, 16 * i)) for i in range(np))
    return RetSubmit(seqnum, status, actual, start, np, errors, data, packets)


@pytest.fixture
async def rig(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> Rig:
    sim: SimServer = await nursery.start(serve_sim, None)
    sysfs = tmp_path / "sysfs"
    sim.publish_sysfs(sysfs)
    server = ServerGateway(
        ServerConfig(
            tls=pki.server_tls(),
            listen=(Address("127.0.0.1", 0),),
            upstream=Address(*sim.addresses[0]),
            policy=PolicySettings(sysfs=sysfs),
        ),
        strings=sim,
    )
    listeners = await nursery.start(server.serve)
    host, port = listeners[0].socket.getsockname()[:2]
    return Rig(sim, server, Address(host, port), sysfs, pki)


def bulk_in(seqnum: int, devid: int, length: int = 64) -> CmdSubmit:
    return CmdSubmit(seqnum, devid, Direction.IN, 1, length)


async def test_the_sysfs_layout_is_known_from_the_import_on(rig: Rig) -> None:
    """No descriptors seen in the session: sysfs alone tells the endpoint is bulk."""
    stream, devid = await rig.imported()
    ret = await answer(stream, bulk_in(1, devid))
    assert (ret.seqnum, ret.status, ret.actual_length) == (1, 0, 64)
    await trio.aclose_forcefully(stream)


async def test_sysfs_outranks_what_the_device_says_in_the_session(rig: Rig) -> None:
    """usbip-host frames by what usbcore parsed (sysfs), not by a reply in the session:
    an endpoint missing there is refused even though the device still serves it."""
    rig.sim.devices[BUSID].sysfs_root = None  # the sysfs below stays as written here
    descriptors = rig.sysfs / BUSID / "descriptors"
    device = descriptors.read_bytes()[:18]
    without_bulk_in = config_descriptor(1, [(0, 0, [(0x01, 0x02)])])
    descriptors.write_bytes(device + without_bulk_in)
    stream, devid = await rig.imported()
    config = setup_packet(0x80, 0x06, 0x0200, 0, 255)
    reply = await answer(stream, CmdSubmit(1, devid, Direction.IN, 0, 255, setup=config))
    assert reply.status == 0  # the device's own configuration has 0x81 ...
    assert b"\x07\x05\x81" in reply.data
    await stream.send_all(bulk_in(2, devid).encode())
    assert await closed(stream)  # ... but usbip-host has no such endpoint: refused
    await trio.aclose_forcefully(stream)


async def test_a_bus_id_now_of_another_device_refuses_the_import(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.sim.devices[BUSID].sysfs_root = None  # the sysfs below stays as written here
    (rig.sysfs / BUSID / "devnum").write_text("99\n")
    stream = await rig.connect()
    with caplog.at_level(logging.WARNING, "gateway.edges.server_gateway"):
        await stream.send_all(OpRequestImport(BUSID).encode())
        assert await receive_exactly(stream, 8) == OpReplyImport(OpStatus.NODEV).encode()
        assert await closed(stream)  # answered as an absent device
        await trio.aclose_forcefully(stream)
        await rig.server.wait_idle()
    assert "sysfs descriptors unreadable or of another device" in caplog.text
    assert "device layout in sysfs unreadable" in caplog.text  # the session's outcome


async def test_alt_setting_changes_are_confirmed_from_sysfs(rig: Rig) -> None:
    stream, devid = await rig.imported()
    iso = (IsoPacket(0, 1024), IsoPacket(1024, 1024))
    iso_in = CmdSubmit(3, devid, Direction.IN, 2, 2048, number_of_packets=2, iso_packets=iso)
    set_alt = setup_packet(0x01, 0x0B, 1, 0, 0)
    ret = await answer(stream, CmdSubmit(1, devid, Direction.OUT, 0, 0, setup=set_alt))
    assert ret.status == 0
    ret = await answer(stream, iso_in)
    assert (ret.seqnum, ret.status, ret.number_of_packets) == (3, 0, 2)
    await trio.aclose_forcefully(stream)


async def test_a_change_sysfs_does_not_show_did_not_happen(rig: Rig) -> None:
    """The device answered SET_INTERFACE with status 0, but usbcore (sysfs) still has
    alt 0: the ISO endpoint does not exist for usbip-host, and is refused."""
    rig.sim.devices[BUSID].sysfs_root = None  # from now on sysfs is not updated
    stream, devid = await rig.imported()
    set_alt = setup_packet(0x01, 0x0B, 1, 0, 0)
    ret = await answer(stream, CmdSubmit(1, devid, Direction.OUT, 0, 0, setup=set_alt))
    assert ret.status == 0
    iso = (IsoPacket(0, 1024),)
    await stream.send_all(
        CmdSubmit(3, devid, Direction.IN, 2, 1024, number_of_packets=1, iso_packets=iso).encode()
    )
    assert await closed(stream)
    await trio.aclose_forcefully(stream)


def test_publish_layout_writes_what_sysfs_shows(tmp_path: Path) -> None:
    device = SourceSink()
    device.publish_layout(tmp_path)
    seen = SysfsLayout(tmp_path).read(BUSID, device.busnum, device.devnum)
    assert seen is not None
    assert seen.active == 1
    assert seen.alternates == {0: 0}
    assert [a.alternate for a in seen.configurations[0].alts] == [0, 1]
    assert SysfsLayout(tmp_path).read(BUSID, device.busnum, device.devnum + 1) is None
