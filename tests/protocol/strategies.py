"""Hypothesis strategies: valid events and whole valid conversations."""

from __future__ import annotations

from hypothesis import strategies as st

from gateway.protocol import (
    ECONNRESET,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
    DeviceInfo,
    Direction,
    Event,
    ExportedDevice,
    InterfaceInfo,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
    check_busid,
)
from gateway.protocol.constants import URB_DMA_MAP_SG

from .helpers import ENUMERATION_SEQNUM, ISO_EPS, enumeration_steps

C, S = Role.CLIENT, Role.SERVER
Steps = list[tuple[Role, Event]]

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
s32 = st.integers(-(2**31), 2**31 - 1)
seqnums = st.integers(0, ENUMERATION_SEQNUM - 1)  # the enumeration's are above

busids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.:_-]{0,30}", fullmatch=True).filter(
    lambda b: check_busid(b) is None
)
paths = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40).filter(
    lambda p: len(p.encode()) < 256
)


@st.composite
def device_infos(draw: st.DrawFn, busid: str | None = None, max_interfaces: int = 4) -> DeviceInfo:
    return DeviceInfo(
        path=draw(paths),
        busid=busid if busid is not None else draw(busids),
        busnum=draw(u16),
        devnum=draw(u16),
        speed=draw(st.one_of(st.integers(0, 6), u32)),
        id_vendor=draw(u16),
        id_product=draw(u16),
        bcd_device=draw(u16),
        device_class=draw(u8),
        device_subclass=draw(u8),
        device_protocol=draw(u8),
        configuration_value=draw(u8),
        num_configurations=draw(u8),
        num_interfaces=draw(st.integers(0, max_interfaces)),
    )


@st.composite
def exported_devices(draw: st.DrawFn) -> ExportedDevice:
    info = draw(device_infos())
    interfaces = draw(
        st.lists(
            st.builds(InterfaceInfo, u8, u8, u8),
            min_size=info.num_interfaces,
            max_size=info.num_interfaces,
        )
    )
    return ExportedDevice(info, tuple(interfaces))


failed_statuses = st.one_of(st.sampled_from(list(OpStatus)[1:]), st.integers(6, 0xFFFFFFFF))


@st.composite
def op_conversations(draw: st.DrawFn) -> Steps:
    kind = draw(st.sampled_from(["devlist", "devlist-failed", "import", "import-failed"]))
    if kind == "devlist":
        devices = draw(st.lists(exported_devices(), max_size=4))
        return [(C, OpRequestDevlist()), (S, OpReplyDevlist(tuple(devices)))]
    if kind == "devlist-failed":
        return [(C, OpRequestDevlist()), (S, OpReplyDevlist(status=draw(failed_statuses)))]
    busid = draw(busids)
    if kind == "import-failed":
        return [(C, OpRequestImport(busid)), (S, OpReplyImport(draw(failed_statuses)))]
    info = draw(device_infos(busid=busid))
    return [(C, OpRequestImport(busid)), (S, OpReplyImport(OpStatus.OK, info))]


@st.composite
def submits(draw: st.DrawFn, seqnum: int, devid: int) -> CmdSubmit:
    """A CMD_SUBMIT to an endpoint of the test device (`helpers.TEST_CONFIG`)."""
    direction = draw(st.sampled_from(Direction))
    ep = draw(st.integers(0, 15))
    iso = ep in ISO_EPS
    if iso:
        lengths = draw(st.lists(st.integers(0, 16), min_size=1, max_size=5))
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        packets = tuple(IsoPacket(o, n) for o, n in zip(offsets, lengths, strict=True))
        length = sum(lengths)
        np = len(packets)
    else:
        packets = ()
        length = draw(st.integers(0, 64))
        np = draw(st.sampled_from([0, NO_ISO_PACKETS]))
    return CmdSubmit(
        seqnum=seqnum,
        devid=devid,
        direction=direction,
        ep=ep,
        transfer_buffer_length=length,
        # usbip-host drops a scatter-gather URB without a buffer; the codec refuses it
        transfer_flags=draw(u32) & ~(URB_DMA_MAP_SG if length == 0 else 0),
        start_frame=draw(s32),
        number_of_packets=np,
        interval=draw(s32),
        setup=draw(st.binary(min_size=8, max_size=8)) if ep else bytes([0x40, 1, 0, 0, 0, 0, 0, 0]),
        data=draw(st.binary(min_size=length, max_size=length))
        if direction == Direction.OUT
        else b"",
        iso_packets=packets,
    )


@st.composite
def completions(draw: st.DrawFn, cmd: CmdSubmit) -> RetSubmit:
    status = draw(st.sampled_from([0, 0, -32, -71, -104]))
    if cmd.iso_packets:
        done = [draw(st.integers(0, p.length)) for p in cmd.iso_packets]
        packets = tuple(
            IsoPacket(p.offset, p.length, n, draw(st.sampled_from([0, -18, -71])))
            for p, n in zip(cmd.iso_packets, done, strict=True)
        )
        actual = sum(done)
        return RetSubmit(
            seqnum=cmd.seqnum,
            status=status,
            actual_length=actual,
            start_frame=draw(s32),
            number_of_packets=len(packets),
            error_count=draw(st.integers(0, len(packets))),
            data=draw(st.binary(min_size=actual, max_size=actual)) if cmd.direction else b"",
            iso_packets=packets,
        )
    actual = draw(st.integers(0, cmd.transfer_buffer_length))
    return RetSubmit(
        seqnum=cmd.seqnum,
        status=status,
        actual_length=actual,
        number_of_packets=cmd.number_of_packets,
        data=draw(st.binary(min_size=actual, max_size=actual)) if cmd.direction else b"",
    )


@st.composite
def urb_conversations(draw: st.DrawFn) -> Steps:
    """An import, then submits, some unlinks, and every URB finished in a shuffled order."""
    info = draw(device_infos(max_interfaces=1))
    steps: Steps = [(C, OpRequestImport(info.busid)), (S, OpReplyImport(OpStatus.OK, info))]
    steps += enumeration_steps(info.devid)
    count = draw(st.integers(1, 6))
    numbers = draw(st.lists(seqnums, min_size=2 * count, max_size=2 * count, unique=True))
    cmds = [draw(submits(numbers[i], info.devid)) for i in range(count)]
    steps += [(C, cmd) for cmd in cmds]
    unlinked = draw(st.lists(st.sampled_from(cmds), unique_by=lambda c: c.seqnum))
    answers: list[tuple[Role, Event]] = []
    for i, cmd in enumerate(unlinked):
        unlink_seq = numbers[count + i]
        steps.append((C, CmdUnlink(unlink_seq, cmd.seqnum, info.devid)))
        if draw(st.booleans()):  # still pending at the server: no RET_SUBMIT
            answers.append((S, RetUnlink(unlink_seq, -ECONNRESET)))
        else:  # raced with completion: RET_SUBMIT first, then RET_UNLINK 0
            answers.append((S, draw(completions(cmd))))
            answers.append((S, RetUnlink(unlink_seq, 0)))
    answers += [(S, draw(completions(cmd))) for cmd in cmds if cmd not in unlinked]
    # Shuffle the server's answers, keeping each RET_SUBMIT before its RET_UNLINK 0.
    order = draw(st.permutations(range(len(answers))))
    first_seen: dict[int, int] = {}
    for rank, index in enumerate(order):
        first_seen[index] = rank
    answers_sorted = sorted(range(len(answers)), key=lambda i: _answer_rank(i, answers, first_seen))
    steps += [answers[i] for i in answers_sorted]
    return steps


def _answer_rank(
    index: int, answers: list[tuple[Role, Event]], ranks: dict[int, int]
) -> tuple[int, int]:
    event = answers[index][1]
    if isinstance(event, RetUnlink) and event.status == 0 and index > 0:
        # keep it after the RET_SUBMIT just before it
        return (ranks[index - 1], 1)
    return (ranks[index], 0)


conversations = st.one_of(op_conversations(), urb_conversations())
