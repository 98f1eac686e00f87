"""Everything the peer may get wrong raises RemoteProtocolError with a clear message."""

from __future__ import annotations

import struct

import pytest

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    CmdUnlink,
    Connection,
    Direction,
    IsoPacket,
    Limits,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    Phase,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
    Role,
    Splice,
)
from gateway.protocol.events import CMD_SUBMIT_HEADER

from .helpers import BUSID, DEVID, ISO_EPS, Trio, device, exported, imported_trio
from .scenarios import all_scenarios

C, S = Role.CLIENT, Role.SERVER


def refused(receiver: Connection, data: bytes, message: str) -> None:
    receiver.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message):
        receiver.next_event()
    assert receiver.phase is Phase.ERROR


def refused_everywhere(trio: Trio, sender: Role, data: bytes, message: str) -> None:
    """The receiving Connection and the Splice both refuse `data` from `sender`."""
    trio.splice.receive_data(sender, data)
    with pytest.raises(RemoteProtocolError, match=message):
        trio.splice.next_frame(sender)
    assert trio.splice.phase is Phase.ERROR
    refused(trio.end(sender.peer), data, message)


def cmd_header(
    length: int, direction: int = 0, ep: int = 2, np: int = 0, devid: int = DEVID
) -> bytes:
    return CMD_SUBMIT_HEADER.pack(1, 10, devid, direction, ep, 0, length, 0, np, 0, bytes(8))


@pytest.mark.parametrize("length", [1025, 2**31 - 1, -1, -(2**31)])
def test_transfer_buffer_length_outside_limit_is_refused_at_the_header(length: int) -> None:
    trio = imported_trio(Limits(max_transfer_length=1024))
    refused_everywhere(trio, C, cmd_header(length), rf"transfer_buffer_length {length} is outside")


def test_transfer_buffer_length_at_the_limit_is_fine() -> None:
    trio = imported_trio(Limits(max_transfer_length=1024))
    trio.server.receive_data(cmd_header(1024))
    assert trio.server.next_event() is NEED_DATA  # waits for the 1024 data bytes
    trio.server.receive_data(bytes(1024))
    assert trio.server.next_event().transfer_buffer_length == 1024  # type: ignore[union-attr]
    trio.server.receive_data(cmd_header(1024, direction=1)[:4] + struct.pack(">I", 11))
    trio.server.receive_data(cmd_header(1024, direction=1)[8:])
    assert trio.server.next_event().seqnum == 11  # type: ignore[union-attr]


def _iso_cmd(np: int) -> CmdSubmit:
    return CmdSubmit(
        seqnum=3,
        devid=DEVID,
        direction=Direction.IN,
        ep=ISO_EPS[0],
        transfer_buffer_length=np,
        number_of_packets=np,
        iso_packets=tuple(IsoPacket(i, 1) for i in range(np)),
    )


def test_iso_packet_count_limit() -> None:
    trio = imported_trio()
    trio.exchange(C, _iso_cmd(1024))
    refused_everywhere(
        trio, C, cmd_header(1025, direction=1, ep=ISO_EPS[0], np=1025), "1025 ISO packets"
    )
    trio = imported_trio(Limits(max_iso_packets=8))
    trio.exchange(C, _iso_cmd(8))
    refused_everywhere(trio, C, cmd_header(9, direction=1, ep=ISO_EPS[0], np=9), "9 ISO packets")


def _three_in_flight() -> Trio:
    trio = imported_trio(Limits(max_pending_urbs=3))
    for seqnum in (1, 2):
        trio.exchange(C, CmdSubmit(seqnum, DEVID, Direction.IN, 1, 1))
    trio.exchange(C, CmdUnlink(3, 1, DEVID))  # an unlink in flight takes a slot too
    return trio


def test_pending_urb_limit() -> None:
    fourth = CmdSubmit(4, DEVID, Direction.IN, 1, 1)
    refused_everywhere(_three_in_flight(), C, fourth.encode(), "more than 3 URBs in flight")
    trio = _three_in_flight()
    trio.exchange(S, RetUnlink(3, -104))  # frees the URB and the unlink
    trio.exchange(C, fourth)
    trio.exchange(C, CmdSubmit(5, DEVID, Direction.IN, 1, 1))
    refused_everywhere(
        trio, C, CmdSubmit(6, DEVID, Direction.IN, 1, 1).encode(), "more than 3 URBs in flight"
    )


def test_too_many_devices_is_refused_at_the_count() -> None:
    trio = Trio.new(Limits(max_devices=2))
    trio.exchange(C, OpRequestDevlist())
    head = OpReplyDevlist((exported("1-1", 0),) * 3).encode()[:12]
    refused_everywhere(trio, S, head, "lists 3 devices, over the limit of 2")
    trio = Trio.new(Limits(max_devices=2))
    trio.exchange(C, OpRequestDevlist())
    trio.exchange(S, OpReplyDevlist((exported("1-1", 0), exported("1-2", 1))))


@pytest.mark.parametrize("kind", ["submit", "unlink"])
def test_urb_for_another_devid_is_refused(kind: str) -> None:
    trio = imported_trio()
    other = DEVID + 1
    cmd = CmdSubmit(1, other, Direction.IN, 1, 1) if kind == "submit" else CmdUnlink(1, 2, other)
    refused_everywhere(trio, C, cmd.encode(), f"devid {other:#x}, but {DEVID:#x} was imported")


@pytest.mark.parametrize("actual", [65, 2**31 - 1, -1])
def test_ret_submit_actual_length_over_what_was_asked(actual: int) -> None:
    trio = imported_trio()
    trio.exchange(C, CmdSubmit(1, DEVID, Direction.IN, 1, 64))
    head = struct.pack(">IIIIIiiiIi", 3, 1, 0, 0, 0, 0, actual, 0, 0, 0) + bytes(8)
    refused_everywhere(trio, S, head, rf"actual_length {actual} is outside 0\.\.64")


def test_ret_submit_for_unknown_seqnum() -> None:
    trio = imported_trio()
    trio.exchange(C, CmdSubmit(1, DEVID, Direction.IN, 1, 64))
    refused_everywhere(trio, S, RetSubmit(2).encode(), "seqnum 2, which is not pending")


@pytest.mark.parametrize(
    ("sender", "frame", "message"),
    [
        (S, CmdSubmit(1, DEVID, Direction.IN, 1, 1).encode(), "command 1 from the server"),
        (S, CmdUnlink(1, 1, DEVID).encode(), "command 2 from the server"),
        (C, RetSubmit(1).encode(), "command 3 from the client"),
        (C, RetUnlink(1).encode(), "command 4 from the client"),
        (C, struct.pack(">I", 0) + bytes(44), "command 0 from the client"),
        (S, struct.pack(">I", 0x80000001) + bytes(44), "command 2147483649 from the server"),
    ],
)
def test_ret_cmd_confusion(sender: Role, frame: bytes, message: str) -> None:
    refused_everywhere(imported_trio(), sender, frame, message)


@pytest.mark.parametrize("version", [0x0110, 0x0100, 0x1101, 0x0000, 0xFFFF])
def test_wrong_version(version: int) -> None:
    raw = struct.pack(">HHI", version, 0x8005, 0)
    refused_everywhere(Trio.new(), C, raw, f"version {version:#06x} is not 0x0111")
    trio = Trio.new()
    trio.exchange(C, OpRequestImport(BUSID))
    refused_everywhere(trio, S, struct.pack(">HHI", version, 3, 0), "version")


@pytest.mark.parametrize("code", [0x8002, 0x8004, 0x8006, 0x8007, 0x0005, 0x0003, 0x1234])
def test_unknown_or_misplaced_op_code_from_client(code: int) -> None:
    raw = struct.pack(">HHI", 0x0111, code, 0)
    refused_everywhere(Trio.new(), C, raw, f"op code {code:#06x} where")


@pytest.mark.parametrize("code", [0x0002, 0x0004, 0x0006, 0x8003, 0x0005])
def test_unknown_or_misplaced_op_code_from_server(code: int) -> None:
    trio = Trio.new()
    trio.exchange(C, OpRequestImport(BUSID))
    refused_everywhere(trio, S, struct.pack(">HHI", 0x0111, code, 0), "REP_IMPORT was expected")


def test_op_request_with_status() -> None:
    refused_everywhere(Trio.new(), C, struct.pack(">HHI", 0x0111, 0x8005, 1), "non-zero status")


def _import_request(busid_field: bytes) -> bytes:
    return struct.pack(">HHI", 0x0111, 0x8003, 0) + busid_field


def test_busid_without_nul() -> None:
    refused_everywhere(Trio.new(), C, _import_request(b"1" * 32), "busid is not NUL-terminated")


@pytest.mark.parametrize(
    "busid", ["../x", "a/b", "..", "1-1/../2", "/etc", "1-1..2", "", "1-1 2", "x\\y", "é"]
)
def test_busid_with_path_tricks(busid: str) -> None:
    field = busid.encode().ljust(32, b"\0")
    refused_everywhere(Trio.new(), C, _import_request(field), "bus id")


@pytest.mark.parametrize("busid", ["../x", "a/b", ".."])
def test_device_record_with_path_tricks(busid: str) -> None:
    trio = Trio.new()
    trio.exchange(C, OpRequestImport(BUSID))
    raw = bytearray(OpReplyImport(OpStatus.OK, device()).encode())
    raw[8 + 256 : 8 + 288] = busid.encode().ljust(32, b"\0")
    refused_everywhere(trio, S, bytes(raw), "bus id")


def test_device_record_path_without_nul() -> None:
    trio = Trio.new()
    trio.exchange(C, OpRequestDevlist())
    raw = bytearray(OpReplyDevlist((exported("1-1", 0),)).encode())
    raw[12 : 12 + 256] = b"p" * 256
    refused_everywhere(trio, S, bytes(raw), "device path is not NUL-terminated")


def test_import_reply_for_a_different_busid() -> None:
    trio = Trio.new()
    trio.exchange(C, OpRequestImport("1-2"))
    raw = OpReplyImport(OpStatus.OK, device("1-3")).encode()
    refused_everywhere(trio, S, raw, "bus id '1-3', not the requested '1-2'")


def _eof_cases() -> list[tuple[str, int]]:
    cases = []
    for name, steps in sorted(all_scenarios().items()):
        for index, (_, event) in enumerate(steps):
            size = len(event.encode())
            for cut in sorted({1, size // 2, size - 1} - {0}):
                cases.append((f"{name}#{index}", cut))
    return cases


@pytest.mark.parametrize(("where", "cut"), _eof_cases())
def test_eof_mid_frame(where: str, cut: int) -> None:
    name, index = where.split("#")
    steps = all_scenarios()[name]
    trio = Trio.new()
    for sender, event in steps[: int(index)]:
        trio.exchange(sender, event)
    sender, event = steps[int(index)]
    partial = trio.end(sender).send(event)[:cut]
    receiver = trio.end(sender.peer)
    receiver.receive_data(partial)
    assert receiver.next_event() is NEED_DATA
    receiver.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"closed the connection mid-message \\({cut} "):
        receiver.next_event()
    trio.splice.receive_data(sender, partial)
    assert trio.splice.next_frame(sender) is NEED_DATA
    trio.splice.receive_data(sender, b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        trio.splice.next_frame(sender)


def test_limits_validate_themselves() -> None:
    for bad in (
        {"max_transfer_length": 0},
        {"max_transfer_length": 2**31},
        {"max_iso_packets": 1025},
        {"max_iso_packets": 0},
        {"max_pending_urbs": 0},
        {"max_devices": 0},
    ):
        with pytest.raises(ValueError, match="must be"):
            Limits(**bad)


def test_splice_refuses_eof_mid_frame_in_either_direction_independently() -> None:
    splice = Splice()
    splice.receive_data(C, OpRequestDevlist().encode()[:5])
    splice.receive_data(S, b"")
    assert splice.next_frame(S).event is not None  # type: ignore[union-attr]
    splice.receive_data(C, b"")
    with pytest.raises(RemoteProtocolError, match="the client closed"):
        splice.next_frame(C)
