"""A client Connection, a Splice and a server Connection driven through random valid
interleavings: submits, completions, unlinks of pending URBs and unlinks that race with
completion. The three must agree on what is pending, and the splice must see the bytes
exactly as sent."""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.protocol import (
    ECONNRESET,
    NEED_DATA,
    CmdSubmit,
    CmdUnlink,
    Event,
    PendingUrb,
    RetSubmit,
    RetUnlink,
    Role,
)

from .helpers import PROFILE, Trio, device
from .strategies import completions, submits

C, S = Role.CLIENT, Role.SERVER


def summary(pending: dict[int, PendingUrb]) -> dict[int, tuple[object, ...]]:
    return {
        seq: (u.ep, u.direction, u.iso, u.transfer_buffer_length, u.number_of_packets)
        for seq, u in pending.items()
    }


class SpliceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trio = Trio.new()
        self.info = self.trio.import_device(device())
        self.up: deque[tuple[bytes, Event]] = deque()
        self.down: deque[tuple[bytes, Event]] = deque()
        self.next_seq = 0x40000000
        self.sent: dict[int, CmdSubmit] = {}
        self.unlink_requested: set[int] = set()
        self.server_unlinks: list[tuple[int, int]] = []  # (unlink seqnum, target)

    def fresh_seqnum(self, data: st.DataObject) -> int:
        self.next_seq += data.draw(st.integers(1, 1000), label="seqnum gap")
        return self.next_seq

    def in_flight(self) -> int:
        return len(self.trio.client.state.pending) + len(self.unlink_requested)

    # -------------------------------------------------------- the client

    @initialize(data=st.data())
    def some_traffic(self, data: st.DataObject) -> None:
        """Start with URBs in every place, so that every rule has something to do."""
        for _ in range(3):
            self.submit(data)
        self.deliver_up(cut=200)
        self.deliver_up(cut=200)
        self.unlink(data)

    @precondition(lambda self: self.in_flight() < 20)
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        cmd = data.draw(submits(self.fresh_seqnum(data), self.info.devid), label="cmd")
        raw = self.trio.client.send(cmd)
        self.sent[cmd.seqnum] = cmd
        self.up.append((raw, cmd))

    @precondition(lambda self: any(not u.unlinked for u in self.trio.client.state.pending.values()))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        candidates = sorted(s for s, u in self.trio.client.state.pending.items() if not u.unlinked)
        target = data.draw(st.sampled_from(candidates), label="unlink target")
        cmd = CmdUnlink(self.fresh_seqnum(data), target, self.info.devid)
        raw = self.trio.client.send(cmd)
        assert self.trio.client.state.pending[target].unlinked
        self.unlink_requested.add(cmd.seqnum)
        self.up.append((raw, cmd))

    # -------------------------------------------------------- the server

    @precondition(lambda self: any(not u.unlinked for u in self.trio.server.state.pending.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        candidates = sorted(s for s, u in self.trio.server.state.pending.items() if not u.unlinked)
        seqnum = data.draw(st.sampled_from(candidates), label="complete")
        ret = data.draw(completions(self.sent[seqnum]), label="ret")
        raw = self.trio.server.send(ret)
        assert seqnum not in self.trio.server.state.pending
        self.down.append((raw, ret))

    @precondition(lambda self: bool(self.server_unlinks))
    @rule(data=st.data())
    def answer_unlink(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.server_unlinks) - 1), label="answer")
        seqnum, target = self.server_unlinks.pop(index)
        was_pending = target in self.trio.server.state.pending
        ret = RetUnlink(seqnum, -ECONNRESET if was_pending else 0)
        raw = self.trio.server.send(ret)
        assert target not in self.trio.server.state.pending
        self.down.append((raw, ret))

    # -------------------------------------------------------- the wire, via the splice

    def carry(self, sender: Role, raw: bytes, event: Event, cut: int) -> None:
        splice = self.trio.splice
        cut = min(cut, len(raw))
        splice.receive_data(sender, raw[:cut])
        if cut < len(raw):
            assert splice.next_frame(sender) is NEED_DATA
            splice.receive_data(sender, raw[cut:])
        frame = splice.next_frame(sender)
        assert frame is not NEED_DATA
        assert frame.raw == raw  # type: ignore[union-attr]
        assert frame.event == event  # type: ignore[union-attr]
        if isinstance(event, CmdSubmit | RetSubmit):
            assert frame.urb is not None  # type: ignore[union-attr]
            assert frame.urb.seqnum == event.seqnum  # type: ignore[union-attr]
        assert splice.next_frame(sender) is NEED_DATA
        receiver = self.trio.end(sender.peer)
        receiver.receive_data(raw)
        assert receiver.next_event() == event
        assert receiver.next_event() is NEED_DATA

    @precondition(lambda self: bool(self.up))
    @rule(cut=st.integers(1, 200))
    def deliver_up(self, cut: int) -> None:
        raw, event = self.up.popleft()
        self.carry(C, raw, event, cut)
        if isinstance(event, CmdUnlink):
            self.server_unlinks.append((event.seqnum, event.unlink_seqnum))

    @precondition(lambda self: bool(self.down))
    @rule(cut=st.integers(1, 200))
    def deliver_down(self, cut: int) -> None:
        raw, event = self.down.popleft()
        self.carry(S, raw, event, cut)
        if isinstance(event, RetUnlink):
            self.unlink_requested.discard(event.seqnum)

    # -------------------------------------------------------- agreement

    @invariant()
    def splice_sits_between_the_ends(self) -> None:
        client = summary(self.trio.client.state.pending)
        splice = summary(self.trio.splice.state.pending)
        server = summary(self.trio.server.state.pending)
        assert server.items() <= splice.items() <= client.items()
        if not self.up and not self.down:
            assert client == splice == server
            flags = [
                {s: u.unlinked for s, u in end.state.pending.items()}
                for end in (self.trio.client, self.trio.splice)
            ]
            assert flags[0] == flags[1]

    @invariant()
    def pending_are_what_was_sent(self) -> None:
        for seq, urb in self.trio.client.state.pending.items():
            cmd = self.sent[seq]
            assert urb.direction == cmd.direction
            assert urb.iso == bool(cmd.iso_packets)


SpliceMachine.TestCase.settings = settings(PROFILE, stateful_step_count=40)
TestSpliceMachine = SpliceMachine.TestCase
