"""Differential: the gateway's `Splice` against a model of usbip-host's reader.

Both consume the same client byte streams, hostile ones included (headers hidden in
payload or in ISO descriptors, endpoints the device lacks, packet counts that do not
fit the endpoint, alt setting changes in between). Every frame the gateway passes must
be exactly the command usbip-host reads there; where the gateway refuses, the stream
stops. The only way the two may part is the kernel dropping the connection first.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    CmdUnlink,
    DeviceInfo,
    Direction,
    Frame,
    IsoPacket,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Payload,
    ProtocolError,
    RetSubmit,
    Role,
    Splice,
)

from .helpers import (
    DEVID,
    PROFILE,
    chunked,
    config_descriptor,
    device,
    enumeration_steps,
    setup_packet,
)
from .kernel_model import AltSpec, StubModel, VhciModel, VhciUrb

C, S = Role.CLIENT, Role.SERVER
_HEADER = struct.Struct(">IIIIIIiiIi8s")

ALTS: tuple[AltSpec, ...] = (
    (0, 0, ((0x81, 0x02), (0x02, 0x02), (0x83, 0x03))),
    (1, 0, ()),
    (1, 1, ((0x84, 0x05), (0x05, 0x01))),
)
CONFIG = config_descriptor(1, [(i, a, list(eps)) for i, a, eps in ALTS])


def header(seq: int, ep: int, direction: int, length: int, np: int, *, flags: int = 0) -> bytes:
    return _HEADER.pack(1, seq, DEVID, direction, ep, flags, length, 0, np, 0, bytes(8))


@st.composite
def pieces(draw: st.DrawFn, seq: int) -> bytes:
    kind = draw(st.sampled_from(["submit", "submit", "submit", "set_interface", "unlink"]))
    if kind == "unlink":
        return CmdUnlink(seq, draw(st.integers(0, seq)), DEVID).encode()
    if kind == "set_interface":
        setup = setup_packet(0x01, 0x0B, draw(st.integers(0, 2)), draw(st.integers(0, 2)), 0)
        return CmdSubmit(seq, DEVID, Direction.OUT, 0, 0, setup=setup).encode()
    ep = draw(st.integers(0, 6))
    direction = draw(st.integers(0, 1))
    length = draw(st.sampled_from([0, 8, 48, 96]))
    np = draw(st.sampled_from([0, 0xFFFFFFFF, 1, 2, 3, 1025]))
    flags = draw(st.sampled_from([0, 0, 0x00040000]))
    hidden = CmdUnlink(0xDEAD0000 + seq, 1, DEVID).encode()  # a whole command, if read as one
    body = b""
    if draw(st.booleans()):  # the payload the header announces for OUT (or not)
        filler = draw(st.sampled_from([hidden, bytes(48)]))
        body += (filler * 2)[:length]
    if draw(st.booleans()) and np not in (0xFFFFFFFF, 1025):  # ISO descriptors (or not)
        body += b"".join(struct.pack(">IIii", 0, length // max(np, 1), 0, 0) for _ in range(np))
    if draw(st.booleans()):
        body += hidden
    return header(seq, ep, direction, length, np, flags=flags) + body


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(1, 8))
    return b"".join(draw(pieces(100 + i)) for i in range(count))


def splice_frames(
    stream: bytes, *, cut_through: bool = False, cuts: list[int] | None = None
) -> list[tuple[int, int]]:
    """Where the gateway cuts `stream`, answering each URB at once as usbip-host would."""
    splice = Splice(cut_through=cut_through)
    info = device()
    steps = [
        (C, header_op_import(info.busid)),
        (S, reply_import(info)),
        *((sender, event.encode()) for sender, event in enumeration_steps(DEVID, CONFIG)),
    ]

    def answer(frame: Frame) -> None:
        if isinstance(frame.event, CmdSubmit):
            ret = RetSubmit(frame.event.seqnum, status=0, actual_length=0)
            splice.receive_data(S, ret.encode())
            splice.next_frame(S)

    return cut(splice, steps, C, stream, answer, cuts=cuts)


def cut(
    splice: Splice,
    steps: list[tuple[Role, bytes]],
    sender: Role,
    stream: bytes,
    answer: Callable[[Frame], None] = lambda frame: None,
    *,
    cuts: list[int] | None = None,
) -> list[tuple[int, int]]:
    """Where `splice`, after `steps`, cuts `stream` from `sender` (`answer` sees each
    frame), up to the first error or the end; fed in pieces at `cuts` if given.

    A cut-through frame's pieces are joined into one; one left unfinished at the end
    is not counted (its data so far is what the kernel would also have read)."""
    for step_sender, raw in steps:
        splice.receive_data(step_sender, raw)
        assert splice.next_frame(step_sender) is not NEED_DATA
    frames: list[tuple[int, int]] = []
    pos = 0
    frame_end = 0  # where the last frame ends once whole
    for piece in chunked(stream, cuts or []):
        splice.receive_data(sender, piece)
        while True:
            try:
                frame = splice.next_frame(sender)
            except ProtocolError:
                return frames
            if not isinstance(frame, Frame):
                break
            size = len(frame.raw)
            if isinstance(frame.event, Payload):
                frames[-1] = (frames[-1][0], pos + size)
            else:
                frames.append((pos, pos + size))
                frame_end = pos + size
                if isinstance(frame.event, CmdSubmit) and frame.event.cut_through:
                    frame_end = pos + 48 + frame.event.transfer_buffer_length
                answer(frame)
            pos += size
    if frames and frames[-1][1] < frame_end:
        frames.pop()
    return frames


def header_op_import(busid: str) -> bytes:
    return OpRequestImport(busid).encode()


def reply_import(info: DeviceInfo) -> bytes:
    return OpReplyImport(OpStatus.OK, info).encode()


def kernel_frames(stream: bytes) -> StubModel:
    model = StubModel(DEVID, {1: ALTS}, active=1)
    model.read(stream)
    return model


def assert_same_cut(stream: bytes) -> None:
    gateway = splice_frames(stream)
    kernel = kernel_frames(stream)
    n = min(len(gateway), len(kernel.frames))
    assert gateway[:n] == kernel.frames[:n], (gateway, kernel.frames)
    if len(gateway) > len(kernel.frames):
        assert kernel.closed is not None, (gateway, kernel.frames)


@PROFILE
@given(streams())
def test_every_frame_passed_is_the_command_usbip_host_reads(stream: bytes) -> None:
    assert_same_cut(stream)


@PROFILE
@given(streams(), st.lists(st.integers(0, 1200), max_size=12))
def test_cut_through_in_any_pieces_cuts_where_usbip_host_reads(
    stream: bytes, cuts: list[int]
) -> None:
    """The gateways' Splice passes bulk data on as it arrives: joined up, its frames are
    still exactly the commands usbip-host reads, whatever the reads were."""
    gateway = splice_frames(stream, cut_through=True, cuts=cuts)
    kernel = kernel_frames(stream)
    n = min(len(gateway), len(kernel.frames))
    assert gateway[:n] == kernel.frames[:n], (gateway, kernel.frames)
    if len(gateway) > len(kernel.frames):
        assert kernel.closed is not None, (gateway, kernel.frames)


def test_payload_for_an_absent_endpoint_is_not_forwarded() -> None:
    """An OUT URB to endpoint 6 (none): the stub reads the header only, so the 48 bytes
    after it would be its next command."""
    hidden = CmdUnlink(0xDEAD, 1, DEVID).encode()
    stream = header(100, 6, 0, 48, 0) + hidden
    assert kernel_frames(stream).frames == [(0, 48), (48, 96)]
    assert splice_frames(stream) == []
    assert_same_cut(stream)


def test_descriptors_on_a_bulk_endpoint_are_not_forwarded() -> None:
    """A bulk IN URB claiming 3 ISO packets: the stub reads no descriptors."""
    hidden = CmdUnlink(0xDEAD, 1, DEVID).encode()
    stream = header(100, 1, 1, 8, 3) + hidden
    assert kernel_frames(stream).frames == [(0, 48), (48, 96)]
    assert splice_frames(stream) == []


def test_a_valid_conversation_passes_whole() -> None:
    set_alt = CmdSubmit(101, DEVID, Direction.OUT, 0, 0, setup=setup_packet(0x01, 0x0B, 1, 1, 0))
    iso = header(102, 4, 1, 32, 2) + struct.pack(">IIii", 0, 16, 0, 0) * 2
    stream = header(100, 2, 0, 8, 0) + bytes(8) + set_alt.encode() + iso
    expected = [(0, 56), (56, 104), (104, 104 + 48 + 32)]
    assert kernel_frames(stream).frames == expected
    assert splice_frames(stream) == expected


def test_the_generated_streams_hit_both_outcomes() -> None:
    """The strategy is not vacuous: some streams pass whole, some are refused early."""
    accepted = refused = 0
    for seq, ep in itertools.product((100,), range(7)):
        stream = header(seq, ep, 1, 8, 0)
        if splice_frames(stream):
            accepted += 1
        else:
            refused += 1
    assert accepted
    assert refused


# -------------------------------------------------------------- vhci-hcd, the other way

# URBs in flight when the server's replies come: (seqnum, CMD_SUBMIT) on the test device
# with alt setting 1 of interface 1 (bulk 0x81/0x02, interrupt 0x83, iso 0x84/0x05).
SET_ALT = CmdSubmit(90, DEVID, Direction.OUT, 0, 0, setup=setup_packet(0x01, 0x0B, 1, 1, 0))
_ISO2 = (IsoPacket(0, 16), IsoPacket(16, 16))
PENDING = (
    CmdSubmit(1, DEVID, Direction.IN, 1, 64),
    CmdSubmit(2, DEVID, Direction.OUT, 2, 64, data=bytes(64)),
    CmdSubmit(3, DEVID, Direction.IN, 4, 32, number_of_packets=2, iso_packets=_ISO2),
    CmdSubmit(
        4, DEVID, Direction.OUT, 5, 32, number_of_packets=2, data=bytes(32), iso_packets=_ISO2
    ),
    CmdSubmit(5, DEVID, Direction.IN, 3, 8),
)


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    seqnum = draw(st.sampled_from([1, 2, 3, 4, 5, 99]))
    if draw(st.integers(0, 5)) == 0:
        return struct.pack(">IIIIIi24x", 4, seqnum, 0, 0, 0, 0)  # RET_UNLINK
    actual = draw(st.sampled_from([0, 8, 32, 64, 100, -1]))
    np = draw(st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]))
    head = struct.pack(">IIIIIiiiIi8x", 3, seqnum, 0, 0, 0, 0, actual, 0, np, 0)
    hidden = struct.pack(">IIIIIi24x", 4, 0xDEAD, 0, 0, 0, 0)
    body = b""
    if draw(st.booleans()) and actual > 0:
        body += (hidden * 3)[:actual]
    if draw(st.booleans()) and np <= 3:
        share = max(actual, 0) // max(np, 1)
        body += b"".join(struct.pack(">IIii", 16 * i, 16, share, 0) for i in range(np))
    if draw(st.booleans()):
        body += hidden
    return head + body


def vhci_pending() -> dict[int, VhciUrb]:
    return {
        c.seqnum: VhciUrb(
            c.direction is Direction.IN,
            bool(c.iso_packets),
            c.number_of_packets,
            c.transfer_buffer_length,
        )
        for c in PENDING
    }


def splice_ret_frames(stream: bytes) -> list[tuple[int, int]]:
    splice = Splice()
    info = device()
    steps = [(C, header_op_import(info.busid)), (S, reply_import(info))]
    steps += [(sender, event.encode()) for sender, event in enumeration_steps(DEVID, CONFIG)]
    steps += [(C, SET_ALT.encode()), (S, RetSubmit(90, 0, 0).encode())]
    steps += [(C, cmd.encode()) for cmd in PENDING]
    return cut(splice, steps, S, stream)


@PROFILE
@given(st.lists(replies(), min_size=1, max_size=6).map(b"".join))
def test_every_reply_passed_is_the_one_vhci_reads(stream: bytes) -> None:
    gateway = splice_ret_frames(stream)
    kernel = VhciModel(vhci_pending())
    kernel.read(stream)
    n = min(len(gateway), len(kernel.frames))
    assert gateway[:n] == kernel.frames[:n], (gateway, kernel.frames)
    if len(gateway) > len(kernel.frames):
        assert kernel.closed is not None, (gateway, kernel.frames)


def test_an_out_reply_carries_no_data_whatever_actual_length_says() -> None:
    """A RET_SUBMIT for an OUT URB claiming 48 bytes: vhci reads none of them, so the
    next 48 bytes are the next reply, and the gateway checks them as one."""
    hidden = struct.pack(">IIIIIi24x", 4, 0xDEAD, 0, 0, 0, 0)
    stream = struct.pack(">IIIIIiiiIi8x", 3, 2, 0, 0, 0, 0, 48, 0, 0, 0) + hidden
    kernel = VhciModel(vhci_pending())
    kernel.read(stream)
    assert kernel.frames == [(0, 48), (48, 96)]
    assert splice_ret_frames(stream) == [(0, 48), (48, 96)]


def test_more_packets_than_asked_are_refused() -> None:
    """vhci replaces a packet count above the URB's by 0 and reads no descriptors."""
    hidden = struct.pack(">IIIIIi24x", 4, 0xDEAD, 0, 0, 0, 0)
    stream = struct.pack(">IIIIIiiiIi8x", 3, 3, 0, 0, 0, 0, 0, 0, 3, 0) + hidden
    kernel = VhciModel(vhci_pending())
    kernel.read(stream)
    assert kernel.frames == [(0, 48), (48, 96)]
    assert splice_ret_frames(stream) == []
