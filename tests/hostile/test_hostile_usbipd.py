"""A broken or hostile usbipd behind the real gateway pair.

Each scenario: a scripted usbipd (tests/hostile/usbipd.py) misbehaves on one session
while a healthy session to the real simulator runs through the same gateways. The
client of the broken session sees a clean end (closed, nothing of the bad frame, no
hang), the server gateway logs the cause, the healthy session keeps working, and open
file descriptors are back to where they were once every session has ended.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from gateway.config import Address, ServerConfig
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import (
    CmdSubmit,
    Connection,
    DeviceInfo,
    Direction,
    OpCode,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
    Setup,
    Speed,
)
from gateway.protocol.constants import OP_HEADER, URB_HEADER_SIZE
from gateway.protocol.descriptors import DESC_CONFIGURATION, GET_DESCRIPTOR, SET_CONFIGURATION
from gateway.sim.catalog import make_devices
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.transport.reads import next_event
from gateway.usbip.importer import ImportedDevice, import_device, list_devices

from ..pkitools import PKI, client_config, server_config
from .usbipd import (
    FakeUsbipd,
    Tracker,
    answer_enumeration,
    drain_until_closed,
    read_exactly,
    reset,
)

HOSTILE_BUSID = "6-6"
HOSTILE = DeviceInfo(
    path="/sys/devices/platform/hostile/usb6/6-6",
    busid=HOSTILE_BUSID,
    busnum=6,
    devnum=6,
    speed=Speed.HIGH,
    id_vendor=0x1234,
    id_product=0x5678,
    bcd_device=0x0100,
    device_class=0xFF,
    device_subclass=0,
    device_protocol=0,
    configuration_value=1,
    num_configurations=1,
    num_interfaces=1,
)
# Its only configuration: one interface with a bulk endpoint 1 in each direction.
HOSTILE_CONFIG = (
    bytes([9, 2, 32, 0, 1, HOSTILE.configuration_value, 0, 0x80, 50])
    + bytes([9, 4, 0, 0, 2, 0xFF, 0, 0, 0])
    + bytes([7, 5, 0x81, 0x02, 0x00, 0x02, 0])
    + bytes([7, 5, 0x01, 0x02, 0x00, 0x02, 0])
)
IN_LENGTH = 4096
REQUEST_TIMEOUT = 0.5  # seconds the server gateway waits for usbipd's op reply
SCENARIO_BOUND = 20  # seconds: no scenario may take longer (a hang fails it)


def open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with suppress(FileNotFoundError):  # the listing's own descriptor
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


@dataclass
class Pair:
    sim: SimServer
    sim_sessions: Tracker
    usbipd: FakeUsbipd
    server: ServerGateway
    client: ClientGateway
    client_address: Address

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.client_address.host, self.client_address.port)

    async def quiet(self) -> None:
        """Until every session has ended on every hop."""
        with trio.fail_after(SCENARIO_BOUND):
            await self.client.acceptor.wait_idle()
            await self.server.wait_idle()
            await self.usbipd.tracker.idle()
            await self.sim_sessions.idle()


@pytest.fixture
async def pair(pki: PKI, nursery: trio.Nursery) -> Pair:
    sim = SimServer(make_devices())
    sim_sessions = Tracker()
    sim.handle_stream = sim_sessions.wrap(sim.handle_stream)  # type: ignore[method-assign,assignment]
    await nursery.start(partial(serve_sim, sim, host="127.0.0.1", port=0))
    usbipd = FakeUsbipd(Address(*sim.addresses[0]))
    upstream = await nursery.start(usbipd.serve)
    config: ServerConfig = server_config(pki, upstream, request_timeout=REQUEST_TIMEOUT)
    server = ServerGateway(config, strings=sim)
    listeners = await nursery.start(server.serve)
    server_address = local_address(listeners[0])
    client = ClientGateway(client_config(pki, server_address))
    listeners = await nursery.start(client.serve)
    client_address = local_address(listeners[0])
    return Pair(sim, sim_sessions, usbipd, server, client, client_address)


# ------------------------------------------------------------------ scripts


async def _imported(stream: trio.SocketStream) -> bytes:
    """Accept the import and answer the enumeration, then return the client's first
    CMD_SUBMIT after it (header only: IN)."""
    await stream.send_all(OpReplyImport(OpStatus.OK, HOSTILE).encode())
    await answer_enumeration(stream, HOSTILE_CONFIG)
    return await read_exactly(stream, URB_HEADER_SIZE)


def _seqnum(cmd: bytes) -> int:
    return int.from_bytes(cmd[4:8], "big")


async def close_mid_import_reply(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(OpReplyImport(OpStatus.OK, HOSTILE).encode()[:100])


async def bad_version(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(OP_HEADER.pack(0x0110, OpCode.REP_IMPORT, 0))
    await drain_until_closed(stream)


async def wrong_device(stream: trio.SocketStream, request: bytes) -> None:
    other = dataclasses.replace(HOSTILE, busid="7-7")
    await stream.send_all(OpReplyImport(OpStatus.OK, other).encode())
    await drain_until_closed(stream)


async def stall(stream: trio.SocketStream, request: bytes) -> None:
    await drain_until_closed(stream)  # never answers; the gateway gives up and closes


async def reset_before_reply(stream: trio.SocketStream, request: bytes) -> None:
    reset(stream)


async def devlist_over_limit(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(OP_HEADER.pack(0x0111, OpCode.REP_DEVLIST, 0) + (5000).to_bytes(4, "big"))
    await drain_until_closed(stream)


async def devlist_close_mid_device(stream: trio.SocketStream, request: bytes) -> None:
    head = OP_HEADER.pack(0x0111, OpCode.REP_DEVLIST, 0) + (2).to_bytes(4, "big")
    await stream.send_all(head + HOSTILE.encode() + bytes(4) + HOSTILE.encode()[:200])


async def close_mid_ret_submit(stream: trio.SocketStream, request: bytes) -> None:
    cmd = await _imported(stream)
    ret = RetSubmit(_seqnum(cmd), 0, IN_LENGTH, data=bytes(IN_LENGTH)).encode()
    await stream.send_all(ret[: URB_HEADER_SIZE + 100])


async def ret_for_unknown_seqnum(stream: trio.SocketStream, request: bytes) -> None:
    cmd = await _imported(stream)
    await stream.send_all(RetSubmit(_seqnum(cmd) + 1000, 0, 0).encode())
    await drain_until_closed(stream)


async def cmd_instead_of_ret(stream: trio.SocketStream, request: bytes) -> None:
    cmd = await _imported(stream)
    await stream.send_all(CmdSubmit(_seqnum(cmd), HOSTILE.devid, Direction.IN, 1, 64).encode())
    await drain_until_closed(stream)


async def ret_longer_than_asked(stream: trio.SocketStream, request: bytes) -> None:
    cmd = await _imported(stream)
    size = 2 * IN_LENGTH
    await stream.send_all(RetSubmit(_seqnum(cmd), 0, size, data=bytes(size)).encode())
    await drain_until_closed(stream)


async def unknown_urb_command(stream: trio.SocketStream, request: bytes) -> None:
    cmd = await _imported(stream)
    await stream.send_all((0x99).to_bytes(4, "big") + cmd[4:])
    await drain_until_closed(stream)


async def ret_unlink_then_garbage_version(stream: trio.SocketStream, request: bytes) -> None:
    # An unsolicited RET_UNLINK is ignored (as vhci does); an op reply after it is not.
    cmd = await _imported(stream)
    # One write, so the gateway reads both frames at once: the valid frame before the
    # offending one must still be forwarded, whatever the read boundaries.
    await stream.send_all(
        RetUnlink(_seqnum(cmd) + 7, 0).encode() + OpReplyImport(OpStatus.OK, HOSTILE).encode()
    )
    await drain_until_closed(stream)


async def reset_mid_urb(stream: trio.SocketStream, request: bytes) -> None:
    await _imported(stream)
    reset(stream)


# ------------------------------------------------------------------ what the client does


async def import_hostile(pair: Pair) -> bytes:
    """IMPORT the hostile device over raw USB/IP; everything received after the reply."""
    stream = await pair.connect()
    conn = Connection(Role.CLIENT)
    async with stream:
        await stream.send_all(conn.send(OpRequestImport(HOSTILE_BUSID)))
        reply = await next_event(stream, conn)
        if not isinstance(reply, OpReplyImport) or reply.device is None:
            # The client gateway answers a failed reply, which `usbip` reports as one.
            assert reply == OpReplyImport(OpStatus.ERROR), f"unexpected {reply!r}"
            return b""
        await enumerate_hostile(stream, conn)
        await stream.send_all(conn.send(CmdSubmit(41, HOSTILE.devid, Direction.IN, 1, IN_LENGTH)))
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        return received


async def enumerate_hostile(stream: trio.SocketStream, conn: Connection) -> None:
    """GET_DESCRIPTOR(configuration), header then whole, and SET_CONFIGURATION, as
    usbcore does first: the codec and the gateways then know endpoint 1."""

    async def control(seqnum: int, setup: Setup) -> RetSubmit:
        direction = Direction.IN if setup.is_in else Direction.OUT
        cmd = CmdSubmit(seqnum, HOSTILE.devid, direction, 0, setup.length, setup=setup.encode())
        await stream.send_all(conn.send(cmd))
        reply = await next_event(stream, conn)
        assert isinstance(reply, RetSubmit), f"unexpected {reply!r}"
        assert (reply.seqnum, reply.status) == (seqnum, 0)
        return reply

    header = await control(1, Setup(0x80, GET_DESCRIPTOR, DESC_CONFIGURATION << 8, 0, 9))
    total = int.from_bytes(header.data[2:4], "little")
    whole = await control(2, Setup(0x80, GET_DESCRIPTOR, DESC_CONFIGURATION << 8, 0, total))
    assert whole.data == HOSTILE_CONFIG
    await control(3, Setup(0x00, SET_CONFIGURATION, whole.data[5], 0, 0))


async def devlist_hostile(pair: Pair) -> bytes:
    with pytest.raises((ConnectionError, trio.BrokenResourceError)):
        await list_devices(await pair.connect())
    return b""


Client = Callable[[Pair], Awaitable[bytes]]
SCENARIOS: dict[str, tuple[Callable[..., Awaitable[None]], Client, str]] = {
    "close-mid-import-reply": (close_mid_import_reply, import_hostile, "mid-message"),
    "bad-version": (bad_version, import_hostile, "version 0x0110 is not 0x0111"),
    "reply-for-another-device": (wrong_device, import_hostile, "IMPORT reply is for bus id '7-7'"),
    "stall": (stall, import_hostile, "usbipd did not answer the IMPORT request"),
    "reset-before-reply": (reset_before_reply, import_hostile, "connection lost"),
    "devlist-over-limit": (devlist_over_limit, devlist_hostile, "over the limit of 1024"),
    "devlist-close-mid-device": (devlist_close_mid_device, devlist_hostile, "mid-message"),
    "devlist-stall": (stall, devlist_hostile, "usbipd did not answer the DEVLIST request"),
    "close-mid-ret-submit": (close_mid_ret_submit, import_hostile, "mid-message"),
    "ret-for-unknown-seqnum": (ret_for_unknown_seqnum, import_hostile, "which is not pending"),
    "cmd-instead-of-ret": (cmd_instead_of_ret, import_hostile, "URB command 1 from the server"),
    "ret-longer-than-asked": (ret_longer_than_asked, import_hostile, f"outside 0..{IN_LENGTH}"),
    "unknown-urb-command": (unknown_urb_command, import_hostile, "URB command 153"),
    "op-reply-in-urb-phase": (
        ret_unlink_then_garbage_version,
        import_hostile,
        f"URB command {0x01110003} from the server",
    ),
    "reset-mid-urb": (reset_mid_urb, import_hostile, "connection lost"),
}


# Frames before the offending one are forwarded: an unsolicited RET_UNLINK is harmless.
# A bulk IN reply's data is passed on as it comes once its header was checked
# (cut-through), so the client has the start of the one cut short, as if the link broke.
FORWARDED = {
    "op-reply-in-urb-phase": RetUnlink(41 + 7, 0).encode(),
    "close-mid-ret-submit": RetSubmit(41, 0, IN_LENGTH, data=bytes(IN_LENGTH)).encode()[
        : URB_HEADER_SIZE + 100
    ],
}


async def healthy_round_trip(device: ImportedDevice, size: int = 32 * 1024) -> None:
    payload = os.urandom(size)
    out = await device.submit(1, Direction.OUT, data=payload)
    assert out.status == 0
    back = bytearray()
    while len(back) < size:
        done = await device.submit(1, Direction.IN, length=size - len(back))
        assert done.status == 0
        back += done.data
    assert bytes(back) == payload


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_broken_usbipd_ends_one_session_cleanly(
    pair: Pair, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    script, client, cause = SCENARIOS[name]
    pair.usbipd.script = script
    caplog.set_level(logging.INFO, "gateway")
    baseline = open_fds()
    with trio.fail_after(SCENARIO_BOUND):
        healthy = await import_device(await pair.connect(), "1-2")  # to the real simulator
        async with trio.open_nursery() as nursery:
            nursery.start_soon(healthy.serve)
            await healthy_round_trip(healthy)
            received = await client(pair)
            await healthy_round_trip(healthy)
            await healthy.aclose()
    # Nothing of the offending frame (nor anything after it) reached the client, but
    # for the checked start of a cut-through one.
    assert received == FORWARDED.get(name, b"")
    assert pair.usbipd.scripted == 1
    await pair.quiet()
    assert open_fds() == baseline, "file descriptors leaked"
    ends = [
        r
        for r in caplog.records
        if r.name == "gateway.edges.server_gateway" and "session end" in r.msg
    ]
    broken = [
        r.getMessage()
        for r in ends
        if HOSTILE_BUSID in r.getMessage() or "devlist" in r.getMessage()
    ]
    assert len(broken) == 1, [r.getMessage() for r in ends]
    assert cause in broken[0]
    assert broken[0].startswith("session end"), broken[0]
    assert pair.sim.connections_active == 0
    # The healthy session ended normally, and its device is free again.
    healthy_ends = [r.getMessage() for r in ends if "busid=1-2" in r.getMessage()]
    assert len(healthy_ends) == 1
    assert "closed by client" in healthy_ends[0], healthy_ends[0]
    assert not pair.sim.in_use("1-2")
