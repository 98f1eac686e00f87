"""Per-seqnum state: reply lengths, unlinks and their races, seqnums kept as they are."""

from __future__ import annotations

import struct

import pytest

from gateway.protocol import (
    ECONNRESET,
    NEED_DATA,
    CmdSubmit,
    CmdUnlink,
    Direction,
    Event,
    IsoPacket,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
    Role,
)

from .helpers import DEVID, ISO_EPS, Trio, drain, drain_frames, imported_trio

C, S = Role.CLIENT, Role.SERVER


def submit(seqnum: int, direction: Direction, ep: int, length: int, iso: int = 0) -> CmdSubmit:
    packets = tuple(IsoPacket(i * 8, 8) for i in range(iso))
    return CmdSubmit(
        seqnum=seqnum,
        devid=DEVID,
        direction=direction,
        ep=ISO_EPS[ep % len(ISO_EPS)] if iso else ep,  # the test device's ISO endpoints
        transfer_buffer_length=length,
        number_of_packets=iso,
        data=bytes(range(length)) if direction is Direction.OUT else b"",
        iso_packets=packets,
    )


def pendings(trio: Trio) -> list[set[int]]:
    return [set(end.pending) for end in (trio.client.state, trio.server.state, trio.splice.state)]


def test_out_of_order_completions_in_one_stream_use_each_urbs_own_shape() -> None:
    trio = imported_trio()
    cmds = [
        submit(900, Direction.IN, 1, 40),
        submit(17, Direction.OUT, 2, 40),
        submit(0xFFFFFFFF, Direction.IN, 3, 32, iso=4),
        submit(0, Direction.OUT, 4, 32, iso=4),
        submit(5, Direction.IN, 0, 20),
    ]
    for cmd in cmds:
        trio.exchange(C, cmd)
    assert pendings(trio) == [{900, 17, 0xFFFFFFFF, 0, 5}] * 3
    rets = [
        RetSubmit(
            0, actual_length=32, number_of_packets=4,
            iso_packets=tuple(IsoPacket(i * 8, 8, 8) for i in range(4)),
        ),
        RetSubmit(5, actual_length=3, data=b"abc"),
        RetSubmit(
            0xFFFFFFFF, actual_length=9, number_of_packets=4, data=b"123456789",
            iso_packets=(
                IsoPacket(0, 8, 8), IsoPacket(8, 8, 1), IsoPacket(16, 8), IsoPacket(24, 8)
            ),
        ),
        RetSubmit(17, actual_length=40),
        RetSubmit(900, actual_length=0, status=-32),
    ]  # fmt: skip
    stream = b"".join(trio.server.send(ret) for ret in rets)
    assert len(stream) == 48 * 5 + 4 * 16 + 3 + 9 + 4 * 16
    trio.client.receive_data(stream)
    assert drain(trio.client) == rets
    trio.splice.receive_data(S, stream)
    frames = drain_frames(trio.splice, S)
    assert [event for event, _ in frames] == rets
    assert b"".join(raw for _, raw in frames) == stream
    assert pendings(trio) == [set()] * 3


def test_seqnums_are_never_renumbered() -> None:
    trio = imported_trio()
    for seqnum in (0xDEAD0000, 2, 0x7FFFFFFF):
        raw = trio.exchange(C, submit(seqnum, Direction.IN, 1, 4))
        assert raw[4:8] == struct.pack(">I", seqnum)
    raw = trio.exchange(C, CmdUnlink(seqnum=1, unlink_seqnum=0x7FFFFFFF, devid=DEVID))
    assert raw[4:8] == struct.pack(">I", 1)
    assert raw[0x14:0x18] == struct.pack(">I", 0x7FFFFFFF)
    raw = trio.exchange(S, RetSubmit(0xDEAD0000, actual_length=1, data=b"z"))
    assert raw[4:8] == struct.pack(">I", 0xDEAD0000)
    assert pendings(trio) == [{2, 0x7FFFFFFF}] * 3


def test_pending_urb_unlinked_with_econnreset_gets_no_ret_submit() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(40, Direction.IN, 1, 64))
    trio.exchange(C, CmdUnlink(seqnum=41, unlink_seqnum=40, devid=DEVID))
    for state in (trio.client.state, trio.server.state, trio.splice.state):
        assert state.pending[40].unlinked
    trio.splice.receive_data(S, RetUnlink(41, -ECONNRESET).encode())
    frame = trio.splice.next_frame(S)
    assert frame.urb is not None  # type: ignore[union-attr]
    assert frame.urb.seqnum == 40  # type: ignore[union-attr]
    trio.client.receive_data(trio.server.send(RetUnlink(41, -ECONNRESET)))
    assert trio.client.next_event() == RetUnlink(41, -ECONNRESET)
    assert pendings(trio) == [set()] * 3
    late = RetSubmit(40, actual_length=0)
    with pytest.raises(LocalProtocolError, match="not pending"):
        trio.server.send(late)
    trio.client.receive_data(late.encode())
    with pytest.raises(RemoteProtocolError, match="seqnum 40, which is not pending"):
        trio.client.next_event()
    trio.splice.receive_data(S, late.encode())
    with pytest.raises(RemoteProtocolError, match="not pending"):
        trio.splice.next_frame(S)


def test_unlink_that_raced_with_completion_is_fine() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(7, Direction.OUT, 2, 3))
    trio.exchange(C, CmdUnlink(seqnum=8, unlink_seqnum=7, devid=DEVID))
    trio.exchange(S, RetSubmit(7, actual_length=3))
    trio.exchange(S, RetUnlink(8, 0))
    assert pendings(trio) == [set()] * 3
    # both seqnums are free again
    trio.exchange(C, submit(7, Direction.IN, 1, 1))
    trio.exchange(C, submit(8, Direction.IN, 1, 1))


def test_ret_unlink_zero_for_a_still_pending_urb_still_drops_it() -> None:
    """usbip-host answers an unlink it carried out with RET_UNLINK alone, status 0 when
    the URB completed anyway: the URB no longer counts as in flight."""
    trio = imported_trio(Limits(max_pending_urbs=2))
    trio.exchange(C, submit(7, Direction.IN, 1, 3))
    trio.exchange(C, CmdUnlink(seqnum=8, unlink_seqnum=7, devid=DEVID))
    trio.exchange(S, RetUnlink(8, 0))
    assert pendings(trio) == [set()] * 3
    trio.exchange(C, submit(9, Direction.IN, 1, 3))  # both slots are free
    trio.exchange(C, submit(10, Direction.IN, 1, 3))


def two_relays(order_a: list[tuple[Role, Event]], order_b: list[tuple[Role, Event]]) -> None:
    """Two Splices (the gateways in series) see one conversation interleaved differently."""
    for order in (order_a, order_b):
        trio = imported_trio()
        for sender, event in order:
            trio.splice.receive_data(sender, event.encode())
            frame = trio.splice.next_frame(sender)
            assert frame.event == event  # type: ignore[union-attr]
        assert trio.splice.state.pending == {}


def test_unlink_sent_before_the_submit_it_targets() -> None:
    """vhci's tx thread sends its unlink list after its submit list; both can fill
    between passes, so CMD_UNLINK(8 -> 7) may precede CMD_SUBMIT(7). usbip-host answers
    the unlink "not found" (status 0) and runs the URB. The client-side gateway sees both
    CMDs before the RET_UNLINK, the server-side one may see the RET_UNLINK in between."""
    unlink, cmd = CmdUnlink(seqnum=8, unlink_seqnum=7, devid=DEVID), submit(7, Direction.IN, 1, 3)
    ret_unlink, ret = RetUnlink(8, 0), RetSubmit(7, actual_length=3, data=b"abc")
    two_relays(
        [(C, unlink), (C, cmd), (S, ret_unlink), (S, ret)],
        [(C, unlink), (S, ret_unlink), (C, cmd), (S, ret)],
    )


def test_ret_unlink_zero_may_overtake_the_ret_submit_of_a_completed_urb() -> None:
    """usbip-host's tx thread sends its RET_SUBMIT list, then its RET_UNLINK list: a URB
    that completes while the unlink is answered "not found" is reported after it."""
    cmd, unlink = submit(7, Direction.OUT, 1, 3), CmdUnlink(seqnum=8, unlink_seqnum=7, devid=DEVID)
    ret_unlink, ret = RetUnlink(8, 0), RetSubmit(7, actual_length=3)
    trio = imported_trio()
    trio.exchange(C, cmd)
    trio.exchange(C, unlink)
    trio.exchange(S, ret_unlink)
    assert pendings(trio) == [set()] * 3
    trio.exchange(S, ret)
    # Once only: a second RET_SUBMIT for it is refused.
    trio.splice.receive_data(S, ret.encode())
    with pytest.raises(RemoteProtocolError, match="seqnum 7, which is not pending"):
        trio.splice.next_frame(S)


def test_late_ret_submits_are_remembered_for_a_bounded_number_of_urbs() -> None:
    trio = imported_trio(Limits(max_pending_urbs=2))
    for seqnum in (1, 3, 5):  # three URBs unlinked "too late", one at a time
        trio.exchange(C, submit(seqnum, Direction.OUT, 1, 0))
        trio.exchange(C, CmdUnlink(seqnum=seqnum + 1, unlink_seqnum=seqnum, devid=DEVID))
        trio.exchange(S, RetUnlink(seqnum + 1, 0))
    trio.exchange(S, RetSubmit(5, actual_length=0))
    trio.exchange(S, RetSubmit(3, actual_length=0))
    trio.splice.receive_data(S, RetSubmit(1, actual_length=0).encode())  # forgotten
    with pytest.raises(RemoteProtocolError, match="seqnum 1, which is not pending"):
        trio.splice.next_frame(S)


def test_reused_seqnum_replaces_a_remembered_urb() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(7, Direction.OUT, 1, 0))
    trio.exchange(C, CmdUnlink(seqnum=8, unlink_seqnum=7, devid=DEVID))
    trio.exchange(S, RetUnlink(8, 0))
    trio.exchange(C, submit(7, Direction.IN, 1, 4))
    trio.exchange(S, RetSubmit(7, actual_length=4, data=b"abcd"))  # the new URB's shape
    assert pendings(trio) == [set()] * 3


def test_unlink_of_unknown_seqnum_and_unknown_ret_unlink() -> None:
    trio = imported_trio()
    trio.exchange(C, CmdUnlink(seqnum=3, unlink_seqnum=12345, devid=DEVID))
    trio.exchange(S, RetUnlink(3, 0))
    trio.exchange(S, RetUnlink(999, 0))  # vhci ignores one it did not ask for
    assert pendings(trio) == [set()] * 3


@pytest.mark.parametrize("second", ["submit", "unlink"])
def test_duplicate_in_flight_seqnum_is_refused(second: str) -> None:
    trio = imported_trio()
    trio.exchange(C, submit(5, Direction.IN, 1, 4))
    dup = submit(5, Direction.OUT, 2, 1) if second == "submit" else CmdUnlink(5, 5, DEVID)
    trio.server.receive_data(dup.encode())
    with pytest.raises(RemoteProtocolError, match="seqnum 5 is already in flight"):
        trio.server.next_event()
    with pytest.raises(LocalProtocolError, match="already in flight"):
        trio.client.send(dup)


def test_unlink_seqnum_in_flight_blocks_reuse_until_answered() -> None:
    trio = imported_trio()
    trio.exchange(C, CmdUnlink(seqnum=3, unlink_seqnum=1, devid=DEVID))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        trio.client.send(submit(3, Direction.IN, 1, 1))
    trio = imported_trio()
    trio.exchange(C, CmdUnlink(seqnum=3, unlink_seqnum=1, devid=DEVID))
    trio.exchange(S, RetUnlink(3, 0))
    trio.exchange(C, submit(3, Direction.IN, 1, 1))


@pytest.mark.parametrize(
    ("cmd", "ret", "wire_len"),
    [
        (submit(1, Direction.IN, 1, 10), RetSubmit(1, actual_length=10, data=bytes(10)), 58),
        (submit(1, Direction.OUT, 1, 10), RetSubmit(1, actual_length=10), 48),
        (
            submit(1, Direction.IN, 1, 16, iso=2),
            RetSubmit(
                1, actual_length=5, number_of_packets=2, data=bytes(5),
                iso_packets=(IsoPacket(0, 8, 5), IsoPacket(8, 8, 0)),
            ),
            48 + 5 + 32,
        ),
        (
            submit(1, Direction.OUT, 1, 16, iso=2),
            RetSubmit(
                1, actual_length=16, number_of_packets=2,
                iso_packets=(IsoPacket(0, 8, 8), IsoPacket(8, 8, 8)),
            ),
            48 + 32,
        ),
    ],
    ids=["in", "out", "iso-in", "iso-out"],
)  # fmt: skip
def test_ret_submit_length_follows_the_urb(cmd: CmdSubmit, ret: RetSubmit, wire_len: int) -> None:
    trio = imported_trio()
    trio.exchange(C, cmd)
    raw = ret.encode()
    assert len(raw) == wire_len
    trio.client.receive_data(raw[:-1])
    assert trio.client.next_event() is NEED_DATA
    trio.client.receive_data(raw[-1:])
    assert trio.client.next_event() == ret


def test_ret_submit_out_with_data_is_refused() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(1, Direction.OUT, 2, 4))
    with pytest.raises(LocalProtocolError, match="OUT carries 0 data bytes"):
        trio.server.send(RetSubmit(1, actual_length=4, data=b"abcd"))


def test_iso_in_lengths_must_add_up() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(1, Direction.IN, 1, 16, iso=2))
    bad = RetSubmit(
        1,
        actual_length=5,
        number_of_packets=2,
        data=bytes(5),
        iso_packets=(IsoPacket(0, 8, 4), IsoPacket(8, 8, 0)),
    )
    trio.client.receive_data(bad.encode())
    with pytest.raises(RemoteProtocolError, match="do not add up"):
        trio.client.next_event()


def test_iso_reply_may_not_have_more_packets_than_asked() -> None:
    trio = imported_trio()
    trio.exchange(C, submit(1, Direction.OUT, 1, 16, iso=2))
    bad = RetSubmit(1, actual_length=0, number_of_packets=3, iso_packets=(IsoPacket(0, 8),) * 3)
    trio.client.receive_data(bad.encode()[:48])
    with pytest.raises(RemoteProtocolError, match="3 ISO packets, the URB had 2"):
        trio.client.next_event()


@pytest.mark.parametrize(
    "packets",
    [
        (IsoPacket(0, 8, 8), IsoPacket(8, 8, -3)),  # negative, but the sum still adds up
        (IsoPacket(0, 8, 1), IsoPacket(8, 8, 9, 0)),  # more than the packet asked for
        (IsoPacket(0, 8, 0), IsoPacket(0xFFFFF000, 8, 5)),  # data placed past the buffer
    ],
    ids=["negative", "over-packet-length", "offset-past-buffer"],
)
def test_iso_in_packet_lengths_stay_inside_the_buffer(packets: tuple[IsoPacket, ...]) -> None:
    """vhci moves each packet's data to buffer + offset (usbip_pad_iso): a bad descriptor
    from the server would write outside the client's transfer buffer."""
    trio = imported_trio()
    trio.exchange(C, submit(1, Direction.IN, 1, 16, iso=2))
    actual = sum(p.actual_length for p in packets)
    bad = RetSubmit(
        1, actual_length=actual, number_of_packets=2, data=bytes(actual), iso_packets=packets
    )
    trio.client.receive_data(bad.encode())
    with pytest.raises(RemoteProtocolError, match="ISO packet 1"):
        trio.client.next_event()
    with pytest.raises(LocalProtocolError, match="ISO packet 1"):
        trio.server.send(bad)


def test_iso_submit_packets_stay_inside_the_buffer() -> None:
    trio = imported_trio()
    cmd = CmdSubmit(
        seqnum=1,
        devid=DEVID,
        direction=Direction.IN,
        ep=ISO_EPS[0],
        transfer_buffer_length=16,
        number_of_packets=2,
        iso_packets=(IsoPacket(0, 8), IsoPacket(12, 8)),
    )
    trio.server.receive_data(cmd.encode())
    with pytest.raises(RemoteProtocolError, match=r"ISO packet 1 .* past the 16-byte buffer"):
        trio.server.next_event()
    with pytest.raises(LocalProtocolError, match="ISO packet 1"):
        trio.client.send(cmd)
