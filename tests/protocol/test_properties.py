"""Hypothesis: round trips of arbitrary valid conversations, and fuzzing every entry point."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Phase,
    RemoteProtocolError,
    Role,
    Splice,
)

from .helpers import PROFILE, Trio, chunked, run_split
from .strategies import Steps, conversations, urb_conversations

cuts = st.lists(st.integers(0, 4096), max_size=20)


@PROFILE
@given(steps=conversations, cuts=cuts)
def test_valid_conversations_round_trip_in_any_chunking(steps: Steps, cuts: list[int]) -> None:
    trio = run_split(steps, lambda data: chunked(data, cuts))
    states = (trio.client.state, trio.server.state, trio.splice.state)
    assert {s.phase for s in states} == {trio.client.phase}
    assert all(s.pending == {} for s in states)


@PROFILE
@given(steps=conversations)
def test_valid_conversations_round_trip_bytewise(steps: Steps) -> None:
    run_split(steps, lambda data: [data[i : i + 1] for i in range(len(data))])


# ---------------------------------------------------------------- fuzzing


def pump_connection(conn: Connection, pieces: list[bytes], close: bool) -> None:
    """Feed `pieces`; every call returns an event or NEED_DATA, or raises RemoteProtocolError."""
    try:
        for piece in [*pieces, b""] if close else pieces:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
    except RemoteProtocolError:
        assert conn.phase is Phase.ERROR


def pump_splice(splice: Splice, sender: Role, pieces: list[bytes], close: bool) -> None:
    try:
        for piece in [*pieces, b""] if close else pieces:
            splice.receive_data(sender, piece)
            while True:
                frame = splice.next_frame(sender)
                if frame is NEED_DATA:
                    break
                assert frame.raw or isinstance(frame.event, ConnectionClosed)  # type: ignore[union-attr]
                if isinstance(frame.event, ConnectionClosed):  # type: ignore[union-attr]
                    break
    except RemoteProtocolError:
        assert splice.phase is Phase.ERROR


def primed(steps: Steps, upto: int) -> Trio:
    """A trio that has exchanged the first `upto` steps of a valid conversation."""
    trio = Trio.new()
    for sender, event in steps[:upto]:
        trio.exchange(sender, event)
    return trio


@PROFILE
@given(steps=conversations, data=st.data(), junk=st.binary(max_size=400), cuts=cuts)
def test_arbitrary_bytes_in_any_phase(
    steps: Steps, data: st.DataObject, junk: bytes, cuts: list[int]
) -> None:
    trio = primed(steps, data.draw(st.integers(0, len(steps))))
    sender = data.draw(st.sampled_from(Role))
    close = data.draw(st.booleans())
    pieces = chunked(junk, cuts)
    pump_connection(trio.end(sender.peer), pieces, close)
    pump_splice(trio.splice, sender, pieces, close)


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at : at + draw(st.integers(1, 8))]
    return bytes(out)


@PROFILE
@given(steps=conversations, data=st.data(), cuts=cuts, close=st.booleans())
def test_mutated_valid_streams(
    steps: Steps, data: st.DataObject, cuts: list[int], close: bool
) -> None:
    index = data.draw(st.integers(0, len(steps) - 1))
    sender = steps[index][0]
    # the rest of this sender's run of messages, mutated as one stream
    end = index
    while end < len(steps) and steps[end][0] is sender:
        end += 1
    trio = primed(steps, index)
    raw = b"".join(trio.end(sender).send(event) for _, event in steps[index:end])
    mutated = data.draw(mutations(raw))
    pieces = chunked(mutated, cuts)
    pump_connection(trio.end(sender.peer), pieces, close)
    pump_splice(trio.splice, sender, pieces, close)


@PROFILE
@given(steps=urb_conversations(), data=st.data())
def test_mutated_header_fields_in_urb_phase(steps: Steps, data: st.DataObject) -> None:
    """Targeted: overwrite one 32-bit header field of a URB frame with an extreme value."""
    index = data.draw(st.integers(2, len(steps) - 1))
    sender = steps[index][0]
    trio = primed(steps, index)
    raw = bytearray(trio.end(sender).send(steps[index][1]))
    field = data.draw(st.integers(0, 11)) * 4
    value = data.draw(st.sampled_from([0, 1, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1025]))
    raw[field : field + 4] = value.to_bytes(4, "big")
    pump_connection(trio.end(sender.peer), [bytes(raw)], close=True)
    pump_splice(trio.splice, sender, [bytes(raw)], close=True)
