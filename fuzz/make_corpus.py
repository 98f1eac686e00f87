"""Write the seed corpus: `python -m fuzz.make_corpus [DIR]` (default fuzz/corpus).

Valid conversations of every message type in the targets' input format
(fuzz/targets.py): DEVLIST and IMPORT (accepted and refused), bulk, control,
interrupt and isochronous URBs both ways on the fuzz device's endpoints, unlinks of
pending and of completed URBs, usbip-win2's 0xffffffff packet count, plus a few seeds
at and just over each limit. The codec frames a CMD_SUBMIT by the device's endpoints, so
a conversation enumerates the device (GET_DESCRIPTOR(configuration), SET_CONFIGURATION
and SET_INTERFACE to the isochronous alt setting, answered) before its first URB to an
endpoint other than 0, or starts from a prefix that did (learned, or loaded as from
sysfs). Deterministic: the same files every time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.protocol import (
    ECONNRESET,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
    Direction,
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

from .targets import (
    BULK_EP,
    BULK_IN,
    BULK_OUT,
    BUSID,
    CONTROL_IN,
    DEVID,
    INTERRUPT_EP,
    INTERRUPT_IN,
    ISO_EP,
    ISO_IN,
    ISO_OUT,
    LIMITS,
    UNLINK_SEQNUM,
    Message,
    Record,
    configuration_descriptor,
    device_info,
    encode_input,
    enumeration_steps,
    exported,
    iso_packets,
    setup,
)

CLIENT, SERVER = 0, 1  # Record.side for a Splice
PEER, LOCAL = 0, 1  # Record.side for a Connection

Seeds = dict[str, bytes]


def _rec(side: int, *events: Message, eof: bool = False, piece: int = 0) -> Record:
    return Record(side, b"".join(e.encode() for e in events), eof, piece)


def _enumeration(client: int, server: int, piece: int = 0) -> list[Record]:
    """A Splice's enumeration of the fuzz device, each message in its own record."""
    return [
        _rec(client if sender is Role.CLIENT else server, event, piece=piece)
        for sender, event in enumeration_steps()
    ]


def _answers_to_pending() -> list[Message]:
    """Completions of every URB the URB prefixes leave pending (fuzz.targets)."""
    config = configuration_descriptor()
    iso_in = tuple(IsoPacket(i * 64, 64, 64 - 8 * i, 0 if i else -18) for i in range(3))
    return [
        RetSubmit(BULK_IN, 0, 512, data=bytes(range(256)) * 2),
        RetSubmit(BULK_OUT, 0, 16),
        RetSubmit(CONTROL_IN, 0, len(config), data=config),
        RetSubmit(
            ISO_IN,
            0,
            sum(p.actual_length for p in iso_in),
            start_frame=17,
            number_of_packets=3,
            error_count=1,
            data=bytes(sum(p.actual_length for p in iso_in)),
            iso_packets=iso_in,
        ),
        RetSubmit(
            ISO_OUT,
            0,
            64,
            number_of_packets=2,
            iso_packets=(IsoPacket(0, 32, 32), IsoPacket(32, 32, 32)),
        ),
        RetSubmit(INTERRUPT_IN, -71, 0, number_of_packets=NO_ISO_PACKETS),
        RetUnlink(UNLINK_SEQNUM, -ECONNRESET),
    ]


def _urb_session() -> tuple[list[Message], list[Message]]:
    """Fresh URBs of every kind from the client, and the server's answers."""
    cmds: list[Message] = [
        CmdSubmit(10, DEVID, Direction.OUT, BULK_EP, 600, data=bytes(i % 251 for i in range(600))),
        CmdSubmit(11, DEVID, Direction.IN, BULK_EP, 600),
        CmdSubmit(12, DEVID, Direction.IN, 0, 18, setup=setup(0x80, 0x06, 0x0100, 0, 18)),
        CmdSubmit(13, DEVID, Direction.OUT, 0, 4, setup=setup(0x40, 0x5B, 0, 0, 4), data=b"ping"),
        CmdSubmit(
            14,
            DEVID,
            Direction.IN,
            ISO_EP,
            4 * 32,
            number_of_packets=4,
            iso_packets=iso_packets(4, 32),
        ),
        CmdSubmit(15, DEVID, Direction.IN, INTERRUPT_EP, 8, number_of_packets=NO_ISO_PACKETS),
        CmdSubmit(16, DEVID, Direction.IN, BULK_EP, 64),
        CmdUnlink(17, 16, DEVID),  # pending: RET_UNLINK -ECONNRESET, no RET_SUBMIT
        CmdUnlink(18, 10, DEVID),  # raced with its completion: RET_UNLINK 0
    ]
    iso = tuple(IsoPacket(i * 32, 32, 32) for i in range(4))
    rets: list[Message] = [
        RetSubmit(10, 0, 600),
        RetUnlink(18, 0),
        RetSubmit(12, 0, 18, data=bytes(18)),
        RetSubmit(11, 0, 600, data=bytes(i % 251 for i in range(600))),
        RetUnlink(17, -ECONNRESET),
        RetSubmit(13, 0, 4),
        RetSubmit(14, 0, 128, number_of_packets=4, data=bytes(128), iso_packets=iso),
        RetSubmit(15, -32, 0, number_of_packets=NO_ISO_PACKETS),
    ]
    return cmds, rets


def splice_seeds() -> Seeds:
    devices = tuple(exported(f"1-{i + 1}", i + 2) for i in range(3))
    info = device_info()
    cmds, rets = _urb_session()
    seeds: Seeds = {
        "devlist": encode_input(
            0,
            [
                _rec(CLIENT, OpRequestDevlist()),
                _rec(SERVER, OpReplyDevlist(devices), eof=True),
                Record(CLIENT, b"", eof=True),
            ],
        ),
        "devlist-empty": encode_input(
            0, [_rec(CLIENT, OpRequestDevlist()), _rec(SERVER, OpReplyDevlist(), eof=True)]
        ),
        "devlist-failed": encode_input(
            2, [_rec(SERVER, OpReplyDevlist(status=OpStatus.ERROR), eof=True)]
        ),
        "devlist-in-pieces": encode_input(
            2, [_rec(SERVER, OpReplyDevlist(devices), piece=7, eof=True)]
        ),
        "import": encode_input(
            0,
            [
                _rec(CLIENT, OpRequestImport(BUSID), piece=3),
                _rec(SERVER, OpReplyImport(OpStatus.OK, info), piece=50),
                Record(CLIENT, b"", eof=True),
            ],
        ),
        "import-refused": encode_input(1, [_rec(SERVER, OpReplyImport(OpStatus.NODEV), eof=True)]),
        "import-busy": encode_input(1, [_rec(SERVER, OpReplyImport(OpStatus.DEV_BUSY))]),
        "urb-session": encode_input(
            3, [*_enumeration(CLIENT, SERVER), _rec(CLIENT, *cmds), _rec(SERVER, *rets)]
        ),
        "urb-session-interleaved": encode_input(
            3,
            _enumeration(CLIENT, SERVER, piece=5)
            + [_rec(CLIENT, c, piece=5) for c in cmds[:4]]
            + [_rec(SERVER, r) for r in rets[:3]]
            + [_rec(CLIENT, *cmds[4:])]
            + [_rec(SERVER, r, piece=1) for r in rets[3:]]
            + [Record(CLIENT, b"", eof=True), Record(SERVER, b"", eof=True)],
        ),
        "answers-to-pending": encode_input(4, [_rec(SERVER, *_answers_to_pending())]),
        "answers-to-pending-loaded": encode_input(5, [_rec(SERVER, *_answers_to_pending())]),
        "answers-in-pieces": encode_input(4, [_rec(SERVER, *_answers_to_pending(), piece=13)]),
        "mid-frame-close": encode_input(
            4, [Record(SERVER, RetSubmit(BULK_IN, 0, 512, data=bytes(512)).encode()[:100], True)]
        ),
        "at-limits": encode_input(
            3,
            [
                *_enumeration(CLIENT, SERVER),
                _rec(
                    CLIENT,
                    CmdSubmit(
                        20,
                        DEVID,
                        Direction.OUT,
                        BULK_EP,
                        LIMITS.max_transfer_length,
                        data=bytes(LIMITS.max_transfer_length),
                    ),
                    CmdSubmit(
                        21,
                        DEVID,
                        Direction.IN,
                        ISO_EP,
                        LIMITS.max_iso_packets,
                        number_of_packets=LIMITS.max_iso_packets,
                        iso_packets=iso_packets(LIMITS.max_iso_packets, 1),
                    ),
                    *(
                        CmdSubmit(200 + i, DEVID, Direction.IN, BULK_EP, 1)
                        for i in range(LIMITS.max_pending_urbs - 2)
                    ),
                ),
            ],
        ),
    }
    over = bytearray(CmdSubmit(30, DEVID, Direction.IN, BULK_EP, 0).encode())
    over[0x18:0x1C] = (LIMITS.max_transfer_length + 1).to_bytes(4, "big")
    seeds["over-transfer-limit"] = encode_input(
        3, [*_enumeration(CLIENT, SERVER), Record(CLIENT, bytes(over))]
    )
    return seeds


def _submit_action(ep: int, direction: int, np: int, size: int, setup_bytes: bytes) -> bytes:
    """A client-connection local action (fuzz.targets._local_submit)."""
    return bytes([0, ep, direction, np]) + size.to_bytes(2, "big") + setup_bytes


def _client_enumeration() -> list[Record]:
    """A client Connection's enumeration: its own control URBs (seqnums 1000..1002, from
    the target's counter), each answered by the peer (the fuzz device's descriptor)."""
    config = configuration_descriptor()
    get_config = setup(0x80, 0x06, 0x0200, 0, len(config))
    return [
        Record(LOCAL, _submit_action(0, 1, 0, len(config), get_config)),  # 1000
        _rec(PEER, RetSubmit(1000, 0, len(config), data=config)),
        Record(LOCAL, _submit_action(0, 0, 0, 0, setup(0x00, 0x09, 1, 0, 0))),  # 1001
        _rec(PEER, RetSubmit(1001, 0, 0)),
        Record(LOCAL, _submit_action(0, 0, 0, 0, setup(0x01, 0x0B, 1, 0, 0))),  # 1002
        _rec(PEER, RetSubmit(1002, 0, 0)),
    ]


def client_connection_seeds() -> Seeds:
    devices = tuple(exported(f"1-{i + 1}", i + 2) for i in range(2))
    _, rets = _urb_session()
    get_device = setup(0x80, 0x06, 0x0100, 0, 18)
    return {
        "devlist": encode_input(0, [_rec(PEER, OpReplyDevlist(devices), eof=True)]),
        "devlist-failed": encode_input(0, [_rec(PEER, OpReplyDevlist(status=1), eof=True)]),
        "import": encode_input(1, [_rec(PEER, OpReplyImport(OpStatus.OK, device_info()))]),
        "import-refused": encode_input(1, [_rec(PEER, OpReplyImport(OpStatus.NODEV), eof=True)]),
        "answers-to-pending": encode_input(3, [_rec(PEER, *_answers_to_pending(), piece=9)]),
        "answers-to-pending-loaded": encode_input(4, [_rec(PEER, *_answers_to_pending())]),
        "local-submits": encode_input(
            2,
            [
                *_client_enumeration(),
                Record(LOCAL, _submit_action(BULK_EP, 1, 0, 64, bytes(8))),  # 1003: bulk IN
                Record(LOCAL, _submit_action(0, 1, 0, 18, get_device)),  # 1004: control IN
                Record(LOCAL, _submit_action(ISO_EP, 1, 4, 128, bytes(8))),  # 1005: ISO IN
                # 1006: bulk OUT, 0xffffffff packets
                Record(LOCAL, _submit_action(BULK_EP, 0, 0xFF, 32, bytes(8))),
                # 1007: interrupt IN, 0xffffffff packets
                Record(LOCAL, _submit_action(INTERRUPT_EP, 1, 0xFF, 8, bytes(8))),
                Record(LOCAL, bytes([1, 0xE8])),  # 1008: unlink 232 (not in flight)
                _rec(
                    PEER,
                    RetSubmit(1004, 0, 18, data=bytes(18)),
                    RetUnlink(1008, -ECONNRESET),
                    RetSubmit(
                        1005,
                        0,
                        96,
                        number_of_packets=4,
                        data=bytes(96),
                        iso_packets=tuple(IsoPacket(i * 32, 32, 24) for i in range(4)),
                    ),
                    RetSubmit(1006, 0, 32, number_of_packets=NO_ISO_PACKETS),
                    RetSubmit(1007, 0, 8, number_of_packets=NO_ISO_PACKETS, data=bytes(8)),
                ),
            ],
        ),
        "urb-replies-unrequested": encode_input(2, [_rec(PEER, *rets)]),
        "close-mid-reply": encode_input(
            1, [Record(PEER, OpReplyImport(OpStatus.OK, device_info()).encode()[:60], True)]
        ),
    }


def _server_enumeration() -> list[Record]:
    """A server Connection's enumeration: the peer's control URBs, each answered by a
    local action (the target answers GET_DESCRIPTOR(configuration) with the descriptor)."""
    config = configuration_descriptor()
    answer = (
        Record(LOCAL, bytes([3, 0, 0]) + len(config).to_bytes(2, "big")),  # the descriptor
        Record(LOCAL, bytes([3, 0, 0, 0, 0])),  # status 0
        Record(LOCAL, bytes([3, 0, 0, 0, 0])),
    )
    commands = [event for sender, event in enumeration_steps() if sender is Role.CLIENT]
    records = []
    for command, reply in zip(commands, answer, strict=True):
        records += [_rec(PEER, command), reply]
    return records


def server_connection_seeds() -> Seeds:
    cmds, _ = _urb_session()
    return {
        "devlist": encode_input(
            0,
            [_rec(PEER, OpRequestDevlist()), Record(LOCAL, bytes([1, 3])), Record(PEER, b"", True)],
        ),
        "import-then-urbs": encode_input(
            0,
            [
                _rec(PEER, OpRequestImport(BUSID), piece=4),
                Record(LOCAL, bytes([0])),
                *_server_enumeration(),
                _rec(PEER, *cmds[:7]),
                *(Record(LOCAL, bytes([3, 0, 0, 0, 64])) for _ in range(3)),
                _rec(PEER, *cmds[7:]),
                Record(LOCAL, bytes([4, 1])),
                Record(LOCAL, bytes([4, 0])),
                Record(PEER, b"", eof=True),
            ],
        ),
        "import-refused": encode_input(
            0, [_rec(PEER, OpRequestImport(BUSID)), Record(LOCAL, bytes([2, 3]))]
        ),
        "urbs": encode_input(
            1,
            [*_server_enumeration(), _rec(PEER, *cmds, piece=11), Record(LOCAL, bytes([3, 1, 0]))],
        ),
        "urbs-learned": encode_input(2, [_rec(PEER, *cmds), Record(LOCAL, bytes([3, 4, 0, 9]))]),
        "urbs-loaded": encode_input(3, [_rec(PEER, *cmds), Record(LOCAL, bytes([3, 3, 0, 0, 8]))]),
        "iso-by-descriptor": encode_input(
            2,
            [
                _rec(
                    PEER,
                    CmdSubmit(
                        40,
                        DEVID,
                        Direction.OUT,
                        ISO_EP,
                        3 * 16,
                        number_of_packets=3,
                        data=bytes(48),
                        iso_packets=iso_packets(3, 16),
                    ),
                ),
                Record(LOCAL, bytes([3, 0, 0, 16])),
            ],
        ),
    }


SEEDS = {
    "splice": splice_seeds,
    "client_connection": client_connection_seeds,
    "server_connection": server_connection_seeds,
}


def write_corpus(root: Path) -> list[Path]:
    written = []
    for harness, make in SEEDS.items():
        directory = root / harness
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            path = directory / name
            path.write_bytes(data)
            written.append(path)
    return written


def main(argv: list[str]) -> None:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "corpus"
    for path in write_corpus(root):
        print(path)


if __name__ == "__main__":
    main(sys.argv)
