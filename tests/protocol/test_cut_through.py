"""Cut-through: a relay's Splice passes bulk and interrupt data on as it arrives.

Whatever the chunking, the pieces it returns join up to exactly the frames it returns
without cut-through, the header of each is checked before any of its data is returned,
and what the gateway itself reads (control transfers, ISO descriptors) still comes whole.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Direction,
    Event,
    Frame,
    LocalProtocolError,
    Payload,
    RemoteProtocolError,
    RetSubmit,
    Role,
    Splice,
)

from .helpers import DEVID, PROFILE, Trio, chunked, drain, imported_trio
from .scenarios import all_scenarios

SCENARIOS = all_scenarios()
C, S = Role.CLIENT, Role.SERVER


def joined(frames: Sequence[Frame]) -> list[tuple[Event, bytes]]:
    """Each cut-through head with the Payload frames after it, as one whole frame."""
    whole: list[tuple[Event, bytes]] = []
    for frame in frames:
        if isinstance(frame.event, Payload):
            event, raw = whole[-1]
            assert isinstance(event, CmdSubmit | RetSubmit)
            assert event.cut_through
            whole[-1] = (event, bytes(raw) + bytes(frame.raw))
        else:
            whole.append((frame.event, bytes(frame.raw)))
    return whole


def run_cut_through(steps: Sequence[tuple[Role, Event]], cuts: list[int]) -> int:
    """Like helpers.run_split, through a cut-through Splice; returns the partial heads seen."""
    trio = Trio(Trio.new().client, Trio.new().server, Splice(cut_through=True))
    partial_heads = 0
    for sender, group in itertools.groupby(steps, key=lambda step: step[0]):
        events = [event for _, event in group]
        raws = [trio.end(sender).send(event) for event in events]
        receiver = trio.end(sender.peer)
        frames: list[Frame] = []
        for piece in chunked(b"".join(raws), cuts):
            receiver.receive_data(piece)
            drain(receiver)
            trio.splice.receive_data(sender, piece)
            while (frame := trio.splice.next_frame(sender)) is not NEED_DATA:
                assert isinstance(frame, Frame)
                frames.append(frame)
        expected = []
        for event, raw in zip(events, raws, strict=True):
            cut = False
            for frame in frames:
                if isinstance(frame.event, CmdSubmit | RetSubmit) and frame.event.cut_through:
                    cut |= frame.event.seqnum == event.seqnum  # type: ignore[union-attr]
            if cut:
                partial_heads += 1
                head = dataclasses.replace(event, data=b"", cut_through=True)  # type: ignore[type-var]
                expected.append((head, raw))
            else:
                expected.append((event, raw))
        assert joined(frames) == expected
        assert trio.splice.buffered(sender) == 0
    return partial_heads


@PROFILE
@given(
    name=st.sampled_from(sorted(SCENARIOS)),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_pieces_join_up_to_the_whole_frames(name: str, cuts: list[int]) -> None:
    run_cut_through(SCENARIOS[name], cuts)


def test_bytewise_every_bulk_or_interrupt_command_with_data_is_cut_through() -> None:
    heads = eligible = 0
    for name in sorted(SCENARIOS):
        steps = SCENARIOS[name]
        heads += run_cut_through(steps, list(range(10_000)))
        for _sender, event in steps:
            if isinstance(event, CmdSubmit) and event.ep != 0 and not event.iso_packets:
                eligible += event.direction == Direction.OUT and event.transfer_buffer_length > 0
    # Byte by byte, each such CMD_SUBMIT is (RET_SUBMITs with IN data come on top).
    assert eligible > 0
    assert heads > eligible


def _bulk_out(seqnum: int, size: int, ep: int = 1) -> CmdSubmit:
    return CmdSubmit(
        seqnum, DEVID, Direction.OUT, ep, size, data=bytes(i % 251 for i in range(size))
    )


def test_a_bad_header_is_refused_before_any_data_with_cut_through() -> None:
    for trio in (imported_trio(), imported_trio(cut_through=True)):
        raw = bytearray(_bulk_out(0x99, 4096, ep=1).encode())
        raw[32:36] = (5).to_bytes(4, "big")  # number_of_packets 5 on a bulk endpoint
        trio.splice.receive_data(C, bytes(raw[:60]))  # the header and 12 data bytes
        with pytest.raises(RemoteProtocolError, match="refused"):
            trio.splice.next_frame(C)


def test_large_bulk_out_passes_in_pieces_and_completes() -> None:
    trio = imported_trio(cut_through=True)
    cmd = _bulk_out(0x100, 100_000)
    raw = cmd.encode()
    trio.splice.receive_data(C, raw[:1000])
    head = trio.splice.next_frame(C)
    assert isinstance(head, Frame)
    assert isinstance(head.event, CmdSubmit)
    assert head.event.cut_through
    assert head.raw == raw[:1000]
    assert head.urb is not None
    assert trio.splice.next_frame(C) is NEED_DATA
    trio.splice.receive_data(C, raw[1000:60_000])
    body = trio.splice.next_frame(C)
    assert isinstance(body, Frame)
    assert isinstance(body.event, Payload)
    assert body.raw == raw[1000:60_000]
    # The rest and the next frame's first bytes in one read: cut at the frame's end.
    nxt = _bulk_out(0x101, 8).encode()
    trio.splice.receive_data(C, raw[60_000:] + nxt)
    rest = trio.splice.next_frame(C)
    assert isinstance(rest, Frame)
    assert rest.raw == raw[60_000:]
    after = trio.splice.next_frame(C)
    assert isinstance(after, Frame)
    assert after.raw == nxt
    # Whole in one read, its data is still not copied into its event.
    assert after.event == CmdSubmit(0x101, DEVID, Direction.OUT, 1, 8, cut_through=True)
    # The answer to the cut-through URB is checked against it as usual.
    trio.splice.receive_data(S, RetSubmit(0x100, actual_length=100_000).encode())
    ret = trio.splice.next_frame(S)
    assert isinstance(ret, Frame)
    assert ret.urb is not None
    assert ret.urb.seqnum == 0x100


def test_bulk_in_reply_passes_in_pieces() -> None:
    trio = imported_trio(cut_through=True)
    trio.splice.receive_data(C, CmdSubmit(0x200, DEVID, Direction.IN, 1, 65536).encode())
    assert isinstance(trio.splice.next_frame(C), Frame)
    ret = RetSubmit(0x200, actual_length=65536, data=bytes(65536)).encode()
    trio.splice.receive_data(S, ret[:48])
    head = trio.splice.next_frame(S)
    assert isinstance(head, Frame)
    assert isinstance(head.event, RetSubmit)
    assert head.event.cut_through
    assert head.raw == ret[:48]
    trio.splice.receive_data(S, ret[48:])
    body = trio.splice.next_frame(S)
    assert isinstance(body, Frame)
    assert isinstance(body.event, Payload)
    assert body.raw == ret[48:]
    # Longer than the URB's buffer: refused on the header, before any data.
    trio.splice.receive_data(C, CmdSubmit(0x201, DEVID, Direction.IN, 1, 16).encode())
    trio.splice.next_frame(C)
    trio.splice.receive_data(S, RetSubmit(0x201, actual_length=17, data=bytes(17)).encode()[:60])
    with pytest.raises(RemoteProtocolError):
        trio.splice.next_frame(S)


def test_control_transfers_are_held_whole() -> None:
    trio = imported_trio(cut_through=True)
    setup = bytes([0x80, 6, 0, 1, 0, 0, 18, 0])  # GET_DESCRIPTOR(device)
    trio.splice.receive_data(C, CmdSubmit(0x300, DEVID, Direction.IN, 0, 18, setup=setup).encode())
    assert isinstance(trio.splice.next_frame(C), Frame)
    ret = RetSubmit(0x300, actual_length=18, data=bytes(18)).encode()
    trio.splice.receive_data(S, ret[:50])
    assert trio.splice.next_frame(S) is NEED_DATA
    trio.splice.receive_data(S, ret[50:])
    whole = trio.splice.next_frame(S)
    assert isinstance(whole, Frame)
    assert whole.raw == ret
    assert isinstance(whole.event, RetSubmit)
    assert not whole.event.cut_through


def test_close_mid_data_is_an_error() -> None:
    trio = imported_trio(cut_through=True)
    raw = _bulk_out(0x400, 4096).encode()
    trio.splice.receive_data(C, raw[:100])
    assert isinstance(trio.splice.next_frame(C), Frame)
    trio.splice.receive_data(C, b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        trio.splice.next_frame(C)


def test_a_partial_event_is_never_encoded() -> None:
    event = CmdSubmit(1, DEVID, Direction.OUT, 1, 10, cut_through=True)
    with pytest.raises(LocalProtocolError):
        event.encode()
    with pytest.raises(LocalProtocolError):
        RetSubmit(1, actual_length=10, cut_through=True).encode()
