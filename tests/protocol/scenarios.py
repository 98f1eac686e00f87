"""Valid conversations covering every message type, used by round-trip and chunking tests."""

from __future__ import annotations

from gateway.protocol import (
    ECONNRESET,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
    Direction,
    Event,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
)

from .helpers import (
    DEVID,
    INTERRUPT_EPS,
    ISO_EPS,
    device,
    enumeration_steps,
    exported,
    get_config_setup,
    setup_packet,
)

C, S = Role.CLIENT, Role.SERVER
Steps = list[tuple[Role, Event]]

FAILED_STATUSES = [OpStatus.NA, OpStatus.DEV_BUSY, OpStatus.DEV_ERR, OpStatus.NODEV, OpStatus.ERROR]


def _import() -> Steps:
    info = device()
    steps: Steps = [(C, OpRequestImport(info.busid)), (S, OpReplyImport(OpStatus.OK, info))]
    return steps + enumeration_steps(info.devid)


def _iso_packets(lengths: list[int], actual: list[int] | None = None) -> tuple[IsoPacket, ...]:
    packets = []
    offset = 0
    for i, length in enumerate(lengths):
        done = actual[i] if actual is not None else 0
        packets.append(IsoPacket(offset, length, done, 0))
        offset += length
    return tuple(packets)


def _payload(n: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt) & 0xFF for i in range(n))


def op_scenarios() -> dict[str, Steps]:
    several = (exported("1-1", 0), exported("1-2", 1, devnum=3), exported("2-1.4.2", 4, 2, 9))
    out: dict[str, Steps] = {
        "devlist-empty": [(C, OpRequestDevlist()), (S, OpReplyDevlist(()))],
        "devlist-one-no-interfaces": [(C, OpRequestDevlist()), (S, OpReplyDevlist(several[:1]))],
        "devlist-one-interface": [(C, OpRequestDevlist()), (S, OpReplyDevlist(several[1:2]))],
        "devlist-several": [(C, OpRequestDevlist()), (S, OpReplyDevlist(several))],
        "devlist-failed": [(C, OpRequestDevlist()), (S, OpReplyDevlist(status=OpStatus.ERROR))],
        "import-ok": _import(),
    }
    for status in FAILED_STATUSES:
        out[f"import-{status.name}"] = [(C, OpRequestImport("1-1")), (S, OpReplyImport(status))]
    return out


def urb_scenarios() -> dict[str, Steps]:
    """Each starts with an import; seqnums are deliberately not contiguous."""
    ctrl_out = CmdSubmit(
        seqnum=0x10,
        devid=DEVID,
        direction=Direction.OUT,
        ep=0,
        transfer_buffer_length=7,
        setup=setup_packet(0x21, 0x09, 0x0200, 0, 7),
        data=b"report!",
    )
    ctrl_in = CmdSubmit(
        seqnum=0x11,
        devid=DEVID,
        direction=Direction.IN,
        ep=0,
        transfer_buffer_length=255,
        setup=get_config_setup(255),
    )
    bulk_out = CmdSubmit(
        seqnum=0x7FFF0001,
        devid=DEVID,
        direction=Direction.OUT,
        ep=2,
        transfer_buffer_length=512,
        transfer_flags=0x40,
        data=_payload(512),
    )
    bulk_in = CmdSubmit(
        seqnum=3, devid=DEVID, direction=Direction.IN, ep=1, transfer_buffer_length=16384
    )
    intr_in = CmdSubmit(
        seqnum=0xFFFFFFFF,
        devid=DEVID,
        direction=Direction.IN,
        ep=INTERRUPT_EPS[0],
        transfer_buffer_length=8,
        interval=4,
    )
    iso_lengths = [192, 192, 96]
    iso_out = CmdSubmit(
        seqnum=41,
        devid=DEVID,
        direction=Direction.OUT,
        ep=ISO_EPS[0],
        transfer_buffer_length=sum(iso_lengths),
        transfer_flags=0x2,
        start_frame=-1,
        number_of_packets=3,
        interval=1,
        data=_payload(sum(iso_lengths), 3),
        iso_packets=_iso_packets(iso_lengths),
    )
    iso_in = CmdSubmit(
        seqnum=43,
        devid=DEVID,
        direction=Direction.IN,
        ep=ISO_EPS[1],
        transfer_buffer_length=sum(iso_lengths),
        start_frame=1234,
        number_of_packets=3,
        interval=1,
        iso_packets=_iso_packets(iso_lengths),
    )
    iso_in_done = [100, 0, 96]
    iso_in_packets = tuple(
        IsoPacket(p.offset, p.length, a, 0 if a else -18)
        for p, a in zip(_iso_packets(iso_lengths), iso_in_done, strict=True)
    )
    out: dict[str, Steps] = {
        "control-out": [
            (C, ctrl_out),
            (S, RetSubmit(seqnum=0x10, actual_length=7)),
        ],
        "control-in": [
            (C, ctrl_in),
            (S, RetSubmit(seqnum=0x11, actual_length=32, data=_payload(32, 1))),
        ],
        "bulk": [
            (C, bulk_out),
            (C, bulk_in),
            (S, RetSubmit(seqnum=3, actual_length=13, data=b"hello, world\n")),
            (S, RetSubmit(seqnum=0x7FFF0001, actual_length=512)),
        ],
        "interrupt": [
            (C, intr_in),
            (S, RetSubmit(seqnum=0xFFFFFFFF, actual_length=8, data=_payload(8, 9))),
        ],
        "iso-out": [
            (C, iso_out),
            (
                S,
                RetSubmit(
                    seqnum=41,
                    actual_length=480,
                    start_frame=77,
                    number_of_packets=3,
                    iso_packets=_iso_packets(iso_lengths, iso_lengths),
                ),
            ),
        ],
        "iso-in": [
            (C, iso_in),
            (
                S,
                RetSubmit(
                    seqnum=43,
                    actual_length=sum(iso_in_done),
                    start_frame=1240,
                    number_of_packets=3,
                    error_count=1,
                    data=_payload(sum(iso_in_done), 5),
                    iso_packets=iso_in_packets,
                ),
            ),
        ],
        "unlink-pending": [
            (C, bulk_in),
            (C, CmdUnlink(seqnum=9, unlink_seqnum=3, devid=DEVID)),
            (S, RetUnlink(seqnum=9, status=-ECONNRESET)),
        ],
        "unlink-raced-completion": [
            (C, bulk_in),
            (C, CmdUnlink(seqnum=12, unlink_seqnum=3, devid=DEVID)),
            (S, RetSubmit(seqnum=3, status=0, actual_length=2, data=b"ok")),
            (S, RetUnlink(seqnum=12, status=0)),
        ],
        "non-iso-packets-0xffffffff": [
            (
                C,
                CmdSubmit(
                    seqnum=70,
                    devid=DEVID,
                    direction=Direction.IN,
                    ep=1,
                    transfer_buffer_length=64,
                    number_of_packets=NO_ISO_PACKETS,
                ),
            ),
            (
                S,
                RetSubmit(
                    seqnum=70,
                    actual_length=4,
                    number_of_packets=NO_ISO_PACKETS,
                    data=b"abcd",
                ),
            ),
        ],
        "non-iso-packets-0": [
            (
                C,
                CmdSubmit(
                    seqnum=71,
                    devid=DEVID,
                    direction=Direction.OUT,
                    ep=2,
                    transfer_buffer_length=4,
                    number_of_packets=0,
                    data=b"wxyz",
                ),
            ),
            (S, RetSubmit(seqnum=71, actual_length=4, number_of_packets=0)),
        ],
    }
    return {name: _import() + steps for name, steps in out.items()}


def all_scenarios() -> dict[str, Steps]:
    return op_scenarios() | urb_scenarios()
