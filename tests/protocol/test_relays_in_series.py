"""Relays in series agree: every interleaving a relay can see is accepted.

The server receives CMDs in order and sends RETs in order, but a relay between it and
the client sees each CMD earlier than the server and each RET later. Two gateways in
series therefore see one conversation interleaved differently, and a Splice must accept
every interleaving in which no RET comes before a CMD the server had received when it
sent that RET. The server below behaves as usbip-host does, races included: unlinks
answered "not found" (status 0) or after cancelling (any status, no RET_SUBMIT), RET_UNLINKs
overtaking RET_SUBMITs, and vhci's CMD_UNLINK that precedes the CMD_SUBMIT it targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    ECONNRESET,
    NEED_DATA,
    CmdSubmit,
    CmdUnlink,
    Direction,
    Event,
    RetSubmit,
    RetUnlink,
    Role,
)

from .helpers import DEVID, PROFILE, imported_trio

C, S = Role.CLIENT, Role.SERVER


@dataclass
class StubModel:
    """usbip-host's bookkeeping: URBs running, completions and unlink answers queued."""

    timeline: list[tuple[Role, Event]] = field(default_factory=list)
    running: dict[int, CmdSubmit] = field(default_factory=dict)
    unlinking: dict[int, int] = field(default_factory=dict)  # target -> CMD_UNLINK seqnum
    submits_out: list[RetSubmit] = field(default_factory=list)
    unlinks_out: list[RetUnlink] = field(default_factory=list)
    submitted: list[int] = field(default_factory=list)
    next_seqnum: int = 1

    def seqnum(self) -> int:
        self.next_seqnum += 1
        return self.next_seqnum - 1

    def receive(self, cmd: CmdSubmit | CmdUnlink) -> None:
        self.timeline.append((C, cmd))
        if isinstance(cmd, CmdSubmit):
            self.running[cmd.seqnum] = cmd
            self.submitted.append(cmd.seqnum)
        elif cmd.unlink_seqnum in self.running and cmd.unlink_seqnum not in self.unlinking:
            self.unlinking[cmd.unlink_seqnum] = cmd.seqnum
        else:
            self.unlinks_out.append(RetUnlink(cmd.seqnum, 0))  # not found

    def complete(self, seqnum: int, status: int) -> None:
        cmd = self.running.pop(seqnum)
        unlink = self.unlinking.pop(seqnum, None)
        if unlink is not None:
            self.unlinks_out.append(RetUnlink(unlink, status))
            return
        data = bytes(cmd.transfer_buffer_length) if cmd.direction is Direction.IN else b""
        self.submits_out.append(
            RetSubmit(seqnum, actual_length=cmd.transfer_buffer_length, data=data)
        )

    def send(self, from_unlinks: bool) -> None:
        queue: list[RetSubmit] | list[RetUnlink] = (
            self.unlinks_out if from_unlinks and self.unlinks_out else self.submits_out
        )
        if queue:
            self.timeline.append((S, queue.pop(0)))


def new_submit(seqnum: int, data: st.DataObject) -> CmdSubmit:
    direction = data.draw(st.sampled_from(Direction), label="direction")
    length = data.draw(st.integers(0, 8), label="length")
    return CmdSubmit(
        seqnum=seqnum,
        devid=DEVID,
        direction=direction,
        ep=1,
        transfer_buffer_length=length,
        data=bytes(length) if direction is Direction.OUT else b"",
    )


def conversation(data: st.DataObject) -> list[tuple[Role, Event]]:
    """What usbip-host receives and sends, in its own order."""
    stub = StubModel()
    actions = ("submit", "unlink first", "unlink", "complete", "send")
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "submit":
            stub.receive(new_submit(stub.seqnum(), data))
        elif action == "unlink first":
            target = stub.seqnum()
            stub.receive(CmdUnlink(stub.seqnum(), target, DEVID))
            stub.receive(new_submit(target, data))
        elif action == "unlink" and stub.submitted:
            target = data.draw(st.sampled_from(stub.submitted), label="target")
            stub.receive(CmdUnlink(stub.seqnum(), target, DEVID))
        elif action == "complete" and stub.running:
            seqnum = data.draw(st.sampled_from(sorted(stub.running)), label="completes")
            stub.complete(seqnum, data.draw(st.sampled_from((0, -ECONNRESET)), label="status"))
        elif action == "send":
            stub.send(data.draw(st.booleans(), label="RET_UNLINK list first"))
    for seqnum in sorted(stub.running):
        stub.complete(seqnum, -ECONNRESET)
    while stub.submits_out or stub.unlinks_out:
        stub.send(data.draw(st.booleans(), label="RET_UNLINK list first"))
    return stub.timeline


def relay_view(timeline: list[tuple[Role, Event]], data: st.DataObject) -> list[tuple[Role, Event]]:
    """The same conversation as a relay sees it: CMDs moved earlier, RETs later."""
    cmds = [(i, e) for i, (r, e) in enumerate(timeline) if r is C]
    rets = [(i, e) for i, (r, e) in enumerate(timeline) if r is S]
    view: list[tuple[Role, Event]] = []
    while cmds or rets:
        # A RET may pass the relay once every CMD the server had before it passed.
        ret_ready = bool(rets) and (not cmds or cmds[0][0] > rets[0][0])
        take_ret = ret_ready and (not cmds or data.draw(st.booleans(), label="RET next"))
        view.append((S, rets.pop(0)[1]) if take_ret else (C, cmds.pop(0)[1]))
    return view


@PROFILE
@given(data=st.data())
def test_every_interleaving_a_relay_can_see_is_accepted(data: st.DataObject) -> None:
    timeline = conversation(data)
    views = [timeline, relay_view(timeline, data), relay_view(timeline, data)]
    for view in views:
        trio = imported_trio()
        splice = trio.splice
        for sender, event in view:
            splice.receive_data(sender, event.encode())
            frame = splice.next_frame(sender)
            assert frame is not NEED_DATA
            assert frame.event == event  # type: ignore[union-attr]
        assert splice.state.pending == {}
