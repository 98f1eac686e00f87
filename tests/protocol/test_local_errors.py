"""Events validate themselves, and `send` refuses what the protocol forbids."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol import (
    CmdSubmit,
    CmdUnlink,
    Connection,
    ConnectionClosed,
    DeviceInfo,
    Direction,
    ExportedDevice,
    InterfaceInfo,
    IsoPacket,
    Limits,
    LocalProtocolError,
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

from .helpers import BUSID, DEVID, ISO_EPS, device, exported, imported_trio

C, S = Role.CLIENT, Role.SERVER


def cmd(**overrides: Any) -> CmdSubmit:
    fields: dict[str, Any] = {
        "seqnum": 1,
        "devid": DEVID,
        "direction": Direction.OUT,
        "ep": 1,
        "transfer_buffer_length": 2,
        "data": b"ab",
    }
    return CmdSubmit(**(fields | overrides))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: cmd(data=b"a"), "OUT carries 2 data bytes, not 1"),
        (lambda: cmd(direction=Direction.IN), "IN carries 0 data bytes, not 2"),
        (lambda: cmd(direction=0, data=b""), "OUT carries 2 data bytes, not 0"),
        (lambda: cmd(direction=1), "IN carries 0 data bytes"),
        (lambda: cmd(direction=2), "neither OUT nor IN"),
        (lambda: cmd(ep=16), "endpoint 16"),
        (lambda: cmd(ep=-1), "endpoint -1"),
        (lambda: cmd(setup=bytes(7)), "setup must be 8 bytes"),
        (lambda: cmd(seqnum=2**32), "seqnum=4294967296 is not a u32"),
        (lambda: cmd(devid=-1), "devid=-1 is not a u32"),
        (lambda: cmd(transfer_buffer_length=-1, data=b""), "transfer_buffer_length"),
        (lambda: cmd(interval=2**31), "interval"),
        (
            lambda: cmd(number_of_packets=2, iso_packets=(IsoPacket(0, 1),)),
            "number_of_packets must count",
        ),
        (lambda: RetSubmit(1, actual_length=3, data=b"ab"), "actual_length bytes"),
        (lambda: RetSubmit(1, actual_length=-1), "actual_length"),
        (lambda: RetSubmit(1, status=2**31), "status"),
        (
            lambda: RetSubmit(1, number_of_packets=1, iso_packets=(IsoPacket(0, 1),) * 2),
            "number_of_packets must count",
        ),
        (lambda: IsoPacket(-1, 1), "offset"),
        (lambda: IsoPacket(0, 1, 0, 2**31), "status"),
        (lambda: CmdUnlink(1, 2**32), "unlink_seqnum"),
        (lambda: RetUnlink(1, status=-(2**31) - 1), "status"),
        (lambda: OpRequestImport("../x"), "bus id"),
        (lambda: OpRequestImport("a/b"), "bus id"),
        (lambda: OpReplyImport(OpStatus.OK), "exactly when OK"),
        (lambda: OpReplyImport(OpStatus.NODEV, device()), "exactly when OK"),
        (lambda: OpReplyImport(-1), "status"),
        (lambda: OpReplyDevlist((exported("1-1", 0),), OpStatus.ERROR), "carries no devices"),
        (lambda: ExportedDevice(device(num_interfaces=2), ()), "declares 2 interfaces"),
        (lambda: InterfaceInfo(256, 0, 0), "interface_class"),
        (lambda: DeviceInfo(**(_device_fields() | {"busnum": 0x10000})), "busnum"),
        (lambda: DeviceInfo(**_device_fields()).encode(), "path"),
    ],
)
def test_events_validate_themselves(build: Any, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        build()


def _device_fields() -> dict[str, Any]:
    info = device()
    fields = {name: getattr(info, name) for name in DeviceInfo.__slots__}  # type: ignore[attr-defined]
    return fields | {"path": "p" * 256}


def test_events_are_frozen() -> None:
    event = cmd()
    with pytest.raises(AttributeError):
        event.seqnum = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (S, CmdSubmit(1, DEVID, Direction.IN, 1, 1)),
        (S, CmdUnlink(2, 1, DEVID)),
        (C, RetSubmit(1)),
        (C, RetUnlink(1)),
        (C, OpReplyDevlist(())),
        (S, OpRequestDevlist()),
        (C, OpRequestImport(BUSID)),
    ],
)
def test_send_of_an_event_the_role_may_not_send(role: Role, event: Any) -> None:
    trio = imported_trio()
    trio.client.send(CmdSubmit(1, DEVID, Direction.IN, 1, 1))
    trio.server.receive_data(CmdSubmit(1, DEVID, Direction.IN, 1, 1).encode())
    trio.server.next_event()
    with pytest.raises(LocalProtocolError, match="not allowed in phase urb"):
        trio.end(role).send(event)
    assert trio.end(role).phase is Phase.ERROR
    with pytest.raises(LocalProtocolError, match="already failed"):
        trio.end(role).send(event)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (CmdSubmit(1, DEVID + 1, Direction.IN, 1, 1), "devid"),
        (CmdSubmit(1, DEVID, Direction.IN, 1, 2048), r"is outside 0\.\.1024"),
        (
            CmdSubmit(
                1,
                DEVID,
                Direction.IN,
                ISO_EPS[0],
                0,
                number_of_packets=3,
                iso_packets=(IsoPacket(0, 0),) * 3,
            ),
            r"3 ISO packets on isochronous .* outside 1\.\.2",
        ),
        (
            CmdSubmit(1, DEVID, Direction.IN, ISO_EPS[0], 0, number_of_packets=2),
            "needs 2 packet descr",
        ),
        (
            CmdSubmit(1, DEVID, Direction.IN, 1, 0, iso_packets=()),
            None,
        ),
    ],
)
def test_client_send_checks_limits_and_state(event: CmdSubmit, message: str | None) -> None:
    trio = imported_trio(Limits(max_transfer_length=1024, max_iso_packets=2))
    if message is None:
        assert trio.client.send(event) == event.encode()
        return
    with pytest.raises(LocalProtocolError, match=message):
        trio.client.send(event)


def test_server_send_checks_the_urb_it_answers() -> None:
    def server_with_pending() -> Connection:
        trio = imported_trio()
        trio.exchange(C, CmdSubmit(1, DEVID, Direction.IN, 1, 4))
        return trio.server

    for ret, message in [
        (RetSubmit(2), "not pending"),
        (RetSubmit(1, actual_length=5, data=bytes(5)), r"actual_length 5 is outside 0\.\.4"),
        (RetSubmit(1, actual_length=4), "IN carries 4 data bytes"),
        (RetSubmit(1, number_of_packets=1, iso_packets=(IsoPacket(0, 1),)), "non-isochronous"),
    ]:
        with pytest.raises(LocalProtocolError, match=message):
            server_with_pending().send(ret)


def test_server_send_refuses_import_reply_for_another_busid() -> None:
    server = Connection(S)
    server.receive_data(OpRequestImport("1-2").encode())
    server.next_event()
    with pytest.raises(LocalProtocolError, match="not the requested"):
        server.send(OpReplyImport(OpStatus.OK, device("1-3")))


def test_server_send_refuses_too_many_devices() -> None:
    server = Connection(S, Limits(max_devices=1))
    server.receive_data(OpRequestDevlist().encode())
    server.next_event()
    with pytest.raises(LocalProtocolError, match="more than 1 devices"):
        server.send(OpReplyDevlist((exported("1-1", 0), exported("1-2", 0))))


def test_connection_closed_sends_nothing_and_splice_refuses_to_inject_it() -> None:
    assert Connection(C).send(ConnectionClosed()) == b""
    with pytest.raises(LocalProtocolError):
        Splice().inject(C, ConnectionClosed())


def test_splice_inject_applies_state() -> None:
    splice = Splice()
    splice.receive_data(C, OpRequestImport(BUSID).encode())
    splice.next_frame(C)
    raw = splice.inject(S, OpReplyImport(OpStatus.NODEV))
    assert raw == OpReplyImport(OpStatus.NODEV).encode()
    assert splice.phase is Phase.DONE
    with pytest.raises(LocalProtocolError):
        splice.inject(S, OpReplyImport(OpStatus.NODEV))


def test_splice_replace_only_filters_a_devlist_reply() -> None:
    splice = Splice()
    splice.receive_data(C, OpRequestDevlist().encode())
    splice.next_frame(C)
    full = OpReplyDevlist((exported("1-1", 0), exported("1-2", 1)))
    splice.receive_data(S, full.encode())
    frame = splice.next_frame(S)
    filtered = OpReplyDevlist((exported("1-2", 1),))
    assert splice.replace(frame, filtered) == filtered.encode()  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="only a DEVLIST reply"):
        splice.replace(frame, OpReplyImport(OpStatus.NA))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="only leave devices out"):
        splice.replace(frame, OpReplyDevlist((*full.devices, exported("1-3", 0))))

    # An IMPORT reply decides the phase, so it can never be swapped after the fact.
    imported = Splice()
    imported.receive_data(C, OpRequestImport("1-1").encode())
    imported.next_frame(C)
    imported.receive_data(S, OpReplyImport(OpStatus.NODEV).encode())
    refusal = imported.next_frame(S)
    with pytest.raises(LocalProtocolError, match="only a DEVLIST reply"):
        imported.replace(refusal, OpReplyDevlist())  # type: ignore[arg-type]


def test_a_failed_splice_keeps_failing_even_with_nothing_buffered() -> None:
    splice = Splice()
    splice.receive_data(C, b"\x01\x11\x12\x34" + bytes(4))
    with pytest.raises(RemoteProtocolError):
        splice.next_frame(C)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        splice.next_frame(S)


def test_data_after_eof_is_a_local_error() -> None:
    conn = Connection(S)
    conn.receive_data(b"")
    conn.receive_data(b"")  # a second close is harmless
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        conn.receive_data(b"x")


def test_plain_int_direction_becomes_the_enum() -> None:
    event = cmd(direction=1, data=b"", transfer_buffer_length=0)
    assert event.direction is Direction.IN
    assert event == cmd(direction=Direction.IN, data=b"", transfer_buffer_length=0)
