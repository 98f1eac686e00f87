"""Each stream parses the same whole, a byte at a time, in random chunks, with trailers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    ConnectionClosed,
    Direction,
    Phase,
    RemoteProtocolError,
    Role,
)

from .helpers import DEVID, PROFILE, Splitter, Trio, chunked, run_split
from .scenarios import Steps, all_scenarios, op_scenarios, urb_scenarios

SCENARIOS = all_scenarios()


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_parses_in_any_split(name: str, split: Splitter) -> None:
    run_split(SCENARIOS[name], split)


@PROFILE
@given(
    name=st.sampled_from(sorted(SCENARIOS)),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_scenario_parses_in_random_chunks(name: str, cuts: list[int]) -> None:
    run_split(SCENARIOS[name], lambda data: chunked(data, cuts))


def test_whole_urb_stream_concatenated_across_scenarios() -> None:
    """All URB scenarios back to back on one connection: seqnums stay distinct."""
    scenarios = [urb_scenarios()[name] for name in sorted(urb_scenarios())]
    steps: Steps = scenarios[0][:2]  # one import
    for scenario in scenarios:
        steps += scenario[2:]
    # Seqnums repeat across scenarios but never while in flight, so this is valid.
    run_split(steps, whole)
    run_split(steps, bytewise)


# ---------------------------------------------------------------- trailing bytes

NEXT_CMD = CmdSubmit(
    seqnum=0xBEEF, devid=DEVID, direction=Direction.OUT, ep=2, transfer_buffer_length=3, data=b"xyz"
)


@pytest.mark.parametrize("keep", [1, 47, 48, 50])
@pytest.mark.parametrize("name", sorted(urb_scenarios()))
def test_trailing_bytes_stay_buffered_in_urb_phase(name: str, keep: int) -> None:
    trio = run_split(urb_scenarios()[name], whole)
    raw = NEXT_CMD.encode()
    head, tail = raw[:keep], raw[keep:]
    trio.server.receive_data(head)
    trio.splice.receive_data(Role.CLIENT, head)
    assert trio.server.next_event() is NEED_DATA
    assert trio.splice.next_frame(Role.CLIENT) is NEED_DATA
    assert trio.splice.buffered(Role.CLIENT) == keep
    trio.server.receive_data(tail)
    trio.splice.receive_data(Role.CLIENT, tail)
    assert trio.server.next_event() == NEXT_CMD
    frame = trio.splice.next_frame(Role.CLIENT)
    assert frame.raw == raw  # type: ignore[union-attr]
    assert 0xBEEF in trio.server.state.pending


def test_trailing_bytes_after_successful_import_reply_stay_buffered() -> None:
    trio = Trio.new()
    trio.exchange(Role.CLIENT, op_scenarios()["import-ok"][0][1])
    reply = op_scenarios()["import-ok"][1][1]
    raw = trio.server.send(reply)
    trio.splice.receive_data(Role.SERVER, raw + b"\x00\x00\x00")
    assert trio.splice.next_frame(Role.SERVER).event == reply  # type: ignore[union-attr]
    assert trio.splice.phase is Phase.URB
    assert trio.splice.next_frame(Role.SERVER) is NEED_DATA
    assert trio.splice.buffered(Role.SERVER) == 3


DONE_SCENARIOS = sorted(n for n in op_scenarios() if n != "import-ok")


@pytest.mark.parametrize("trailer", [b"\x00", b"\x01\x11\x80\x05\x00\x00\x00\x00"])
@pytest.mark.parametrize("name", DONE_SCENARIOS)
def test_trailing_bytes_after_final_op_reply_are_refused(name: str, trailer: bytes) -> None:
    request, reply = op_scenarios()[name]
    trio = Trio.new()
    trio.exchange(*request)
    raw = trio.server.send(reply[1])
    trio.client.receive_data(raw + trailer)
    assert trio.client.next_event() == reply[1]
    assert trio.client.phase is Phase.DONE
    with pytest.raises(RemoteProtocolError, match="nothing to say"):
        trio.client.next_event()
    assert trio.client.phase is Phase.ERROR
    trio.splice.receive_data(Role.SERVER, raw + trailer)
    assert trio.splice.next_frame(Role.SERVER).raw == raw  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError):
        trio.splice.next_frame(Role.SERVER)


@pytest.mark.parametrize("name", sorted(op_scenarios()))
def test_trailing_client_bytes_after_op_request_are_refused(name: str) -> None:
    request = op_scenarios()[name][0][1]
    raw = request.encode()
    server = Trio.new().server
    server.receive_data(raw + b"\x01")
    assert server.next_event() == request
    with pytest.raises(RemoteProtocolError, match="client sent 1 bytes"):
        server.next_event()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_clean_close_after_a_whole_stream(name: str) -> None:
    trio = run_split(SCENARIOS[name], whole)
    for role in Role:
        trio.end(role).receive_data(b"")
        assert trio.end(role).next_event() == ConnectionClosed()
        trio.splice.receive_data(role, b"")
        assert trio.splice.next_frame(role).event == ConnectionClosed()  # type: ignore[union-attr]
