"""The op phase, the switch to URB traffic after a successful import, and the dead ends."""

from __future__ import annotations

import pytest

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    Direction,
    LocalProtocolError,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    Phase,
    RemoteProtocolError,
    RetSubmit,
    Role,
    Splice,
)

from .helpers import BUSID, DEVID, Trio, device, enumeration_steps, imported_trio
from .scenarios import FAILED_STATUSES

BULK_IN = CmdSubmit(seqnum=1, devid=DEVID, direction=Direction.IN, ep=1, transfer_buffer_length=64)


def test_import_switches_the_same_connection_to_urb_frames() -> None:
    splice = Splice()
    splice.receive_data(Role.CLIENT, OpRequestImport(BUSID).encode())
    assert splice.next_frame(Role.CLIENT).event == OpRequestImport(BUSID)  # type: ignore[union-attr]
    assert splice.phase is Phase.IMPORT_REPLY
    splice.receive_data(Role.SERVER, OpReplyImport(OpStatus.OK, device()).encode())
    assert splice.next_frame(Role.SERVER).event.status == 0  # type: ignore[union-attr]
    assert splice.phase is Phase.URB
    assert splice.state.imported == device()
    for sender, event in enumeration_steps(DEVID):  # the endpoints become known
        splice.receive_data(sender, event.encode())
        assert splice.next_frame(sender).event == event  # type: ignore[union-attr]
    splice.receive_data(Role.CLIENT, BULK_IN.encode())
    frame = splice.next_frame(Role.CLIENT)
    assert frame.event == BULK_IN  # type: ignore[union-attr]
    assert frame.urb is not None  # type: ignore[union-attr]
    assert frame.urb.seqnum == 1  # type: ignore[union-attr]
    splice.receive_data(Role.SERVER, RetSubmit(1, actual_length=1, data=b"!").encode())
    assert splice.next_frame(Role.SERVER).event.data == b"!"  # type: ignore[union-attr]


def test_urb_frames_before_import_are_refused() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(BULK_IN.encode())
    with pytest.raises(RemoteProtocolError, match="version"):
        server.next_event()
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="not allowed in phase op-request"):
        client.send(BULK_IN)


def _finished(request: OpRequestDevlist | OpRequestImport, reply: object) -> Trio:
    trio = Trio.new()
    trio.exchange(Role.CLIENT, request)
    trio.exchange(Role.SERVER, reply)  # type: ignore[arg-type]
    for phase in (trio.client.phase, trio.server.phase, trio.splice.phase):
        assert phase is Phase.DONE
    return trio


FINISHED = [
    pytest.param(OpRequestDevlist(), OpReplyDevlist(()), id="devlist"),
    pytest.param(OpRequestDevlist(), OpReplyDevlist(status=OpStatus.NA), id="devlist-failed"),
    *(
        pytest.param(OpRequestImport(BUSID), OpReplyImport(s), id=f"import-{s.name}")
        for s in FAILED_STATUSES
    ),
]


@pytest.mark.parametrize(("request_", "reply"), FINISHED)
@pytest.mark.parametrize("sender", list(Role))
def test_any_byte_after_the_last_op_reply_is_an_error(
    request_: OpRequestDevlist | OpRequestImport, reply: object, sender: Role
) -> None:
    trio = _finished(request_, reply)
    receiver = trio.end(sender.peer)
    receiver.receive_data(b"\x00")
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    trio.splice.receive_data(sender, b"\x00")
    with pytest.raises(RemoteProtocolError):
        trio.splice.next_frame(sender)
    assert trio.splice.phase is Phase.ERROR
    # and once failed, it stays failed, whichever direction speaks next
    trio.splice.receive_data(sender.peer, b"\x01")
    with pytest.raises(RemoteProtocolError, match="already failed"):
        trio.splice.next_frame(sender.peer)


@pytest.mark.parametrize(("request_", "reply"), FINISHED)
def test_nothing_more_may_be_sent_after_the_last_op_reply(
    request_: OpRequestDevlist | OpRequestImport, reply: object
) -> None:
    trio = _finished(request_, reply)
    with pytest.raises(LocalProtocolError):
        trio.client.send(OpRequestDevlist())
    trio = _finished(request_, reply)
    with pytest.raises(LocalProtocolError):
        trio.client.send(BULK_IN)
    trio = _finished(request_, reply)
    with pytest.raises(LocalProtocolError):
        trio.server.send(reply)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "request_", [OpRequestDevlist(), OpRequestImport(BUSID)], ids=["devlist", "import"]
)
@pytest.mark.parametrize(
    "early",
    [OpRequestDevlist().encode(), OpRequestImport("1-2").encode(), b"\x01"],
    ids=["devlist", "import", "one-byte"],
)
def test_client_data_while_the_reply_is_awaited_is_refused(
    request_: OpRequestDevlist | OpRequestImport, early: bytes
) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(request_.encode() + early)
    assert server.next_event() == request_
    with pytest.raises(RemoteProtocolError, match="nothing to say"):
        server.next_event()
    splice = Splice()
    splice.receive_data(Role.CLIENT, request_.encode())
    splice.next_frame(Role.CLIENT)
    splice.receive_data(Role.CLIENT, early)
    with pytest.raises(RemoteProtocolError):
        splice.next_frame(Role.CLIENT)
    client = Connection(Role.CLIENT)
    client.send(request_)
    with pytest.raises(LocalProtocolError):
        client.send(OpRequestDevlist())


def test_server_may_not_speak_first_or_answer_the_wrong_request() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(OpReplyDevlist(()).encode())
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    client = Connection(Role.CLIENT)
    client.send(OpRequestDevlist())
    client.receive_data(OpReplyImport(OpStatus.NODEV).encode())
    with pytest.raises(RemoteProtocolError, match="REP_DEVLIST was expected"):
        client.next_event()
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(OpReplyDevlist(()))
    server = Connection(Role.SERVER)
    server.receive_data(OpRequestImport(BUSID).encode())
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(OpReplyDevlist(()))


def test_failed_import_leaves_no_device_and_no_urb_phase() -> None:
    trio = _finished(OpRequestImport(BUSID), OpReplyImport(OpStatus.DEV_BUSY))
    assert trio.splice.state.imported is None
    trio.client.receive_data(RetSubmit(1).encode())
    with pytest.raises(RemoteProtocolError):
        trio.client.next_event()


def test_a_whole_stream_with_close_still_parses_the_last_message() -> None:
    trio = imported_trio()
    trio.client.send(BULK_IN)
    raw = RetSubmit(1, actual_length=2, data=b"ok").encode()
    trio.client.receive_data(raw)
    trio.client.receive_data(b"")
    assert trio.client.next_event() == RetSubmit(1, actual_length=2, data=b"ok")
    assert trio.client.next_event() != NEED_DATA
    with pytest.raises(LocalProtocolError):
        trio.client.receive_data(b"more")
