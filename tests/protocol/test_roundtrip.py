"""Every message type: encode -> decode -> equal event, decode -> encode -> same bytes."""

from __future__ import annotations

import struct

import pytest

from gateway.protocol import (
    NEED_DATA,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
    Connection,
    Direction,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
    Splice,
)

from .helpers import BUSID, DEVID, ISO_EPS, Trio, device, exported, imported_trio
from .scenarios import FAILED_STATUSES, Steps, all_scenarios

SCENARIOS = all_scenarios()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_round_trips(name: str) -> None:
    steps: Steps = SCENARIOS[name]
    trio = Trio.new()
    for sender, event in steps:
        trio.exchange(sender, event)
    for end in (trio.client.state, trio.server.state, trio.splice.state):
        assert end.pending == {}
        assert end.phase is trio.client.phase


# ---------------------------------------------------------------- wire layout, by hand

V = b"\x01\x11"


def _decode(role: Role, raw: bytes, prelude: list[bytes] | None = None) -> object:
    """Decode `raw` at a Connection of `role` after it has seen `prelude` from its peer."""
    conn = Connection(role)
    for chunk in prelude or []:
        conn.receive_data(chunk)
        assert conn.next_event() is not NEED_DATA
    conn.receive_data(raw)
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return event


def test_op_request_layouts() -> None:
    assert OpRequestDevlist().encode() == V + b"\x80\x05" + bytes(4)
    raw = V + b"\x80\x03" + bytes(4) + BUSID.encode().ljust(32, b"\0")
    assert len(raw) == 40
    assert OpRequestImport(BUSID).encode() == raw
    assert _decode(Role.SERVER, raw) == OpRequestImport(BUSID)


def _device_record(busid: str, busnum: int, devnum: int, n_if: int) -> bytes:
    info = device(busid, busnum=busnum, devnum=devnum, num_interfaces=n_if)
    return struct.pack(
        ">256s32sIIIHHHBBBBBB",
        info.path.encode(),
        busid.encode(),
        busnum,
        devnum,
        3,
        0x1D6B,
        0x0104,
        0x0100,
        0xEF,
        2,
        1,
        1,
        1,
        n_if,
    )


def test_import_reply_layouts() -> None:
    record = _device_record(BUSID, 3, 7, 1)
    assert len(record) == 312
    ok = V + b"\x00\x03" + bytes(4) + record
    assert len(ok) == 320
    assert OpReplyImport(OpStatus.OK, device()).encode() == ok
    request = OpRequestImport(BUSID).encode()
    client = Connection(Role.CLIENT)
    client.send(OpRequestImport(BUSID))
    client.receive_data(ok)
    assert client.next_event() == OpReplyImport(OpStatus.OK, device())
    assert device().devid == (3 << 16) | 7 == DEVID
    for status in FAILED_STATUSES:
        raw = V + b"\x00\x03" + struct.pack(">I", status)
        assert OpReplyImport(status).encode() == raw
        splice = Splice()
        splice.receive_data(Role.CLIENT, request)
        splice.next_frame(Role.CLIENT)
        splice.receive_data(Role.SERVER, raw)
        frame = splice.next_frame(Role.SERVER)
        assert frame.event == OpReplyImport(status)  # type: ignore[union-attr]
        assert frame.raw == raw  # type: ignore[union-attr]
        assert len(frame.raw) == 8  # type: ignore[union-attr]


def test_devlist_reply_layout() -> None:
    devices = (exported("1-1", 0), exported("1-2", 2, devnum=3))
    interfaces = bytes([0xFF, 0, 1, 0, 0xFF, 1, 2, 0])
    raw = (
        V
        + b"\x00\x05"
        + bytes(4)
        + struct.pack(">I", 2)
        + _device_record("1-1", 1, 2, 0)
        + _device_record("1-2", 1, 3, 2)
        + interfaces
    )
    assert len(raw) == 12 + 312 + 312 + 8
    assert OpReplyDevlist(devices).encode() == raw
    client = Connection(Role.CLIENT)
    client.send(OpRequestDevlist())
    client.receive_data(raw)
    decoded = client.next_event()
    assert decoded == OpReplyDevlist(devices)
    assert decoded.encode() == raw  # type: ignore[union-attr]
    assert OpReplyDevlist(status=OpStatus.ERROR).encode() == V + b"\x00\x05" + b"\0\0\0\x05"


def test_cmd_submit_layout() -> None:
    setup = bytes([0x80, 6, 0, 1, 0, 0, 18, 0])
    raw = struct.pack(">IIIIIIiiIi", 1, 0x2A, DEVID, 1, 0, 0x200, 18, 0, 0, 0) + setup
    assert len(raw) == 48
    event = CmdSubmit(
        seqnum=0x2A,
        devid=DEVID,
        direction=Direction.IN,
        ep=0,
        transfer_buffer_length=18,
        transfer_flags=0x200,
        setup=setup,
    )
    assert event.encode() == raw
    trio = imported_trio()
    trio.server.receive_data(raw)
    assert trio.server.next_event() == event


def test_iso_submit_layout_data_then_descriptors() -> None:
    packets = (IsoPacket(0, 3), IsoPacket(3, 3))
    event = CmdSubmit(
        seqnum=5,
        devid=DEVID,
        direction=Direction.OUT,
        ep=4,
        transfer_buffer_length=6,
        number_of_packets=2,
        data=b"abcdef",
        iso_packets=packets,
    )
    head = struct.pack(">IIIIIIiiIi", 1, 5, DEVID, 0, 4, 0, 6, 0, 2, 0) + bytes(8)
    descriptors = struct.pack(">IIII", 0, 3, 0, 0) + struct.pack(">IIII", 3, 3, 0, 0)
    assert event.encode() == head + b"abcdef" + descriptors


def test_ret_and_unlink_layouts() -> None:
    ret = RetSubmit(seqnum=5, status=-32, actual_length=2, data=b"hi", error_count=0)
    assert ret.encode() == (
        struct.pack(">IIIIIiiiIi", 3, 5, 0, 0, 0, -32, 2, 0, 0, 0) + bytes(8) + b"hi"
    )
    unlink = CmdUnlink(seqnum=6, unlink_seqnum=5, devid=DEVID)
    assert unlink.encode() == struct.pack(">IIIIII", 2, 6, DEVID, 0, 0, 5) + bytes(24)
    assert RetUnlink(seqnum=6, status=-104).encode() == (
        struct.pack(">IIIIIi", 4, 6, 0, 0, 0, -104) + bytes(24)
    )


@pytest.mark.parametrize("number_of_packets", [0, NO_ISO_PACKETS])
@pytest.mark.parametrize("direction", [Direction.IN, Direction.OUT])
def test_non_iso_number_of_packets_is_kept(number_of_packets: int, direction: Direction) -> None:
    trio = imported_trio()
    data = b"\x01\x02\x03" if direction is Direction.OUT else b""
    cmd = CmdSubmit(
        seqnum=100,
        devid=DEVID,
        direction=direction,
        ep=1,
        transfer_buffer_length=3,
        number_of_packets=number_of_packets,
        data=data,
    )
    raw = trio.exchange(Role.CLIENT, cmd)
    assert raw[0x20:0x24] == struct.pack(">I", number_of_packets)
    for state in (trio.client.state, trio.server.state, trio.splice.state):
        urb = state.pending[100]
        assert urb.iso is False
    ret = RetSubmit(
        seqnum=100,
        actual_length=3,
        number_of_packets=number_of_packets,
        data=b"xyz" if direction is Direction.IN else b"",
    )
    raw = trio.exchange(Role.SERVER, ret)
    assert raw[0x20:0x24] == struct.pack(">I", number_of_packets)
    assert len(raw) == 48 + len(ret.data)


def test_iso_in_reply_data_is_packed() -> None:
    trio = imported_trio()
    packets = (IsoPacket(0, 100), IsoPacket(100, 100), IsoPacket(200, 100))
    trio.exchange(
        Role.CLIENT,
        CmdSubmit(
            seqnum=8,
            devid=DEVID,
            direction=Direction.IN,
            ep=ISO_EPS[1],
            transfer_buffer_length=300,
            number_of_packets=3,
            iso_packets=packets,
        ),
    )
    done = (IsoPacket(0, 100, 10), IsoPacket(100, 100, 0, -18), IsoPacket(200, 100, 5))
    ret = RetSubmit(
        seqnum=8, actual_length=15, number_of_packets=3, data=b"a" * 15, iso_packets=done
    )
    raw = trio.exchange(Role.SERVER, ret)
    assert len(raw) == 48 + 15 + 3 * 16
    assert raw[48 + 15 + 16 + 12 : 48 + 15 + 32] == struct.pack(">i", -18)
