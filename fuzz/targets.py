"""Fuzz targets over the sans-I/O codec: pure functions of one byte string.

No atheris here, so the same targets run the committed corpus inside pytest
(`tests/fuzz/`) and under libFuzzer (`python -m fuzz.run HARNESS`).

Input format, shared by every target:

    byte 0          which prefix to start from (mod the target's prefix count): a
                    conversation fed through the codec's own public path first, so the
                    fuzzed bytes land in the op phase or in the URB phase, with only
                    endpoint 0 known, or with URBs of every kind pending on the fuzz
                    device's endpoints, their layout learned from the enumeration in the
                    conversation or loaded as from sysfs (the codec frames a CMD_SUBMIT
                    by the device's endpoints: docs/wire-framing.md)
    then records    tag u8, length u16 (big-endian), payload (cut short at the end)
      tag bit 0     Splice: 0 bytes from the client, 1 bytes from the server.
                    Connection: 0 bytes from the peer, 1 a local action (we send)
      tag bit 1     the sender closes its end after this payload
      tag bits 2-7  0: feed the payload whole; n: feed it in pieces of n bytes

Invariant checked on every input: each frame parses, or the codec raises
RemoteProtocolError; nothing else escapes (a local action the protocol forbids may raise
LocalProtocolError, from `send` only). Memory stays bounded: once a reader returns
NEED_DATA, what it buffers is less than the largest frame the limits allow in the
current phase, and URBs in flight never exceed `max_pending_urbs`. A Splice also
accounts for every byte (forwarded frames plus buffered equals fed), sizes each event
exactly (encoding it gives as many bytes as the frame had), and cuts the same frames
whatever the read boundaries (the input is replayed with whole payloads and compared).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache

from gateway.protocol import (
    ECONNRESET,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
    Connection,
    ConnectionClosed,
    DeviceInfo,
    Direction,
    Event,
    ExportedDevice,
    InterfaceInfo,
    IsoPacket,
    Limits,
    LocalProtocolError,
    NeedData,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    PendingUrb,
    Phase,
    ProtocolState,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
    Role,
    Setup,
    Speed,
    Splice,
)
from gateway.protocol.constants import ISO_DESCRIPTOR, URB_HEADER_SIZE, TransferType
from gateway.protocol.descriptors import (
    DESC_CONFIGURATION,
    GET_DESCRIPTOR,
    Configuration,
    parse_configuration,
)
from gateway.protocol.events import OpEvent, UrbEvent
from gateway.protocol.records import DEVICE_RECORD_SIZE, INTERFACE_RECORD_SIZE
from gateway.sim.descriptors import (
    ConfigurationDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
)

C, S = Role.CLIENT, Role.SERVER
Message = OpEvent | UrbEvent  # what can be encoded and sent

# Small limits, so the fuzzer reaches every limit check within a few KiB of input.
LIMITS = Limits(max_transfer_length=4096, max_iso_packets=8, max_pending_urbs=16, max_devices=4)

BUSID = "1-2"
BUSNUM, DEVNUM = 1, 3
DEVID = (BUSNUM << 16) | DEVNUM

# Seqnums of the URBs a prefix leaves pending, for seeds to answer.
BULK_IN, BULK_OUT, CONTROL_IN, ISO_IN, ISO_OUT, INTERRUPT_IN, UNLINKED = 1, 2, 3, 4, 5, 6, 7
UNLINK_SEQNUM = 8
# The fuzz device's endpoint numbers (fuzz_configuration) and its configuration value.
BULK_EP, ISO_EP, INTERRUPT_EP = 1, 2, 3
CONFIGURATION_VALUE = 1
ISO_ALTERNATE = 1  # interface 0's alt setting with the isochronous endpoints
# Seqnums of the enumeration URBs (enumeration_steps).
ENUMERATION_SEQNUM = 100

_RECORD = struct.Struct(">BH")


class FuzzFailure(AssertionError):
    """An invariant broke: a real finding, not a protocol error."""


# ------------------------------------------------------------------ input format


@dataclass(frozen=True, slots=True)
class Record:
    side: int  # Splice: 0 client, 1 server. Connection: 0 peer bytes, 1 local action
    payload: bytes
    eof: bool = False
    piece: int = 0  # 0: whole; n: pieces of n bytes (1..63)

    def encode(self) -> bytes:
        tag = (self.side & 1) | (2 if self.eof else 0) | ((self.piece & 0x3F) << 2)
        return _RECORD.pack(tag, len(self.payload)) + self.payload


def encode_input(prefix: int, records: list[Record]) -> bytes:
    return bytes([prefix]) + b"".join(r.encode() for r in records)


def decode_input(data: bytes) -> tuple[int, list[Record]]:
    if not data:
        return 0, []
    prefix, pos, records = data[0], 1, []
    while pos + _RECORD.size <= len(data):
        tag, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        payload = data[pos : pos + length]
        pos += length
        records.append(Record(tag & 1, payload, bool(tag & 2), tag >> 2))
    return prefix, records


def pieces(record: Record) -> Iterator[bytes]:
    if record.piece == 0 or len(record.payload) <= record.piece:
        if record.payload:
            yield record.payload
        return
    for start in range(0, len(record.payload), record.piece):
        yield record.payload[start : start + record.piece]


# ------------------------------------------------------------------ bounds


def frame_bound(phase: Phase, sender: Role, limits: Limits) -> int:
    """The largest frame `sender` may send in `phase` under `limits`."""
    if phase is Phase.URB:
        return (
            URB_HEADER_SIZE
            + limits.max_transfer_length
            + ISO_DESCRIPTOR.size * (limits.max_iso_packets)
        )
    if phase is Phase.OP_REQUEST and sender is C:
        return 8 + 32
    if phase is Phase.IMPORT_REPLY and sender is S:
        return 8 + DEVICE_RECORD_SIZE
    if phase is Phase.DEVLIST_REPLY and sender is S:
        return 12 + limits.max_devices * (DEVICE_RECORD_SIZE + 0xFF * INTERFACE_RECORD_SIZE)
    return 0  # nothing may be sent: any byte is an error


def check_bounds(state_phase: Phase, sender: Role, buffered: int, in_flight: int) -> None:
    bound = frame_bound(state_phase, sender, LIMITS)
    if buffered and buffered >= max(bound, 1):
        raise FuzzFailure(
            f"{sender.value} reader holds {buffered} bytes at NEED_DATA in phase "
            f"{state_phase.value}; the largest frame is {bound}"
        )
    if in_flight > LIMITS.max_pending_urbs:
        raise FuzzFailure(f"{in_flight} URBs in flight, over {LIMITS.max_pending_urbs}")


def _in_flight(conn: Splice | Connection) -> int:
    state = conn.state
    return len(state.pending) + len(state._unlinks)


# ------------------------------------------------------------------ valid pieces


def device_info(busid: str = BUSID, configuration_value: int = 1) -> DeviceInfo:
    return DeviceInfo(
        path=f"/sys/devices/platform/fuzz/usb{BUSNUM}/{busid}",
        busid=busid,
        busnum=BUSNUM,
        devnum=DEVNUM,
        speed=Speed.HIGH,
        id_vendor=0x0525,
        id_product=0xA4A0,
        bcd_device=0x0100,
        device_class=0xFF,
        device_subclass=0,
        device_protocol=0,
        configuration_value=configuration_value,
        num_configurations=1,
        num_interfaces=1,
    )


def exported(busid: str, devnum: int) -> ExportedDevice:
    info = dataclasses.replace(device_info(busid), devnum=devnum)
    return ExportedDevice(info, (InterfaceInfo(0xFF, 0, 0),))


def setup(request_type: int, request: int, value: int, index: int, length: int) -> bytes:
    return Setup(request_type, request, value, index, length).encode()


def fuzz_configuration() -> ConfigurationDescriptor:
    """The fuzz device: Gadget Zero source/sink's bulk 0x81/0x01 and, in alt setting 1,
    isochronous 0x82/0x02, plus an interrupt IN 0x83 in both alt settings."""
    bulk = (
        EndpointDescriptor(0x80 | BULK_EP, TransferType.BULK, 512),
        EndpointDescriptor(BULK_EP, TransferType.BULK, 512),
    )
    interrupt = (EndpointDescriptor(0x80 | INTERRUPT_EP, TransferType.INTERRUPT, 8, 4),)
    iso = (
        EndpointDescriptor(0x80 | ISO_EP, TransferType.ISOCHRONOUS, 1024, 4),
        EndpointDescriptor(ISO_EP, TransferType.ISOCHRONOUS, 1024, 4),
    )
    return ConfigurationDescriptor(
        CONFIGURATION_VALUE,
        (
            InterfaceDescriptor(0, 0, 0xFF, endpoints=bulk + interrupt),
            InterfaceDescriptor(0, ISO_ALTERNATE, 0xFF, endpoints=bulk + interrupt + iso),
        ),
    )


@cache
def configuration_descriptor() -> bytes:
    """What GET_DESCRIPTOR(configuration) returns for the fuzz device."""
    return fuzz_configuration().encode(True)


@cache
def parsed_configuration() -> Configuration:
    parsed = parse_configuration(configuration_descriptor())
    assert parsed is not None
    assert parsed.irregular is None
    return parsed


def iso_packets(count: int, size: int) -> tuple[IsoPacket, ...]:
    return tuple(IsoPacket(i * size, size) for i in range(count))


def pending_submits() -> list[Message]:
    """A URB of every kind, left pending: what server-side seeds answer."""
    np_in = 3
    return [
        CmdSubmit(BULK_IN, DEVID, Direction.IN, BULK_EP, 512),
        CmdSubmit(BULK_OUT, DEVID, Direction.OUT, BULK_EP, 16, data=bytes(range(16))),
        CmdSubmit(
            CONTROL_IN,
            DEVID,
            Direction.IN,
            0,
            255,
            setup=setup(0x80, 0x06, 0x0200, 0, 255),
        ),
        CmdSubmit(
            ISO_IN,
            DEVID,
            Direction.IN,
            ISO_EP,
            np_in * 64,
            number_of_packets=np_in,
            iso_packets=iso_packets(np_in, 64),
        ),
        CmdSubmit(
            ISO_OUT,
            DEVID,
            Direction.OUT,
            ISO_EP,
            2 * 32,
            number_of_packets=2,
            data=bytes(64),
            iso_packets=iso_packets(2, 32),
        ),
        # Interrupt IN, with 0xffffffff packets as usbip-win2 sends for "not ISO".
        CmdSubmit(
            INTERRUPT_IN, DEVID, Direction.IN, INTERRUPT_EP, 8, number_of_packets=NO_ISO_PACKETS
        ),
        CmdSubmit(UNLINKED, DEVID, Direction.IN, BULK_EP, 64),
        CmdUnlink(UNLINK_SEQNUM, UNLINKED, DEVID),
    ]


def get_configuration_setup(length: int) -> bytes:
    return setup(0x80, GET_DESCRIPTOR, DESC_CONFIGURATION << 8, 0, length)


def enumeration_steps(seqnum: int = ENUMERATION_SEQNUM) -> list[tuple[Role, Message]]:
    """Enumeration the codec watches, as usbcore does it: the configuration descriptor
    and SET_CONFIGURATION, answered; then SET_INTERFACE to the alt setting with the
    isochronous endpoints. After it, every endpoint the seeds use is known."""
    config = configuration_descriptor()
    get = get_configuration_setup(len(config))
    set_configuration = setup(0x00, 0x09, CONFIGURATION_VALUE, 0, 0)
    set_interface = setup(0x01, 0x0B, ISO_ALTERNATE, 0, 0)
    return [
        (C, CmdSubmit(seqnum, DEVID, Direction.IN, 0, len(config), setup=get)),
        (S, RetSubmit(seqnum, 0, len(config), data=config)),
        (C, CmdSubmit(seqnum + 1, DEVID, Direction.OUT, 0, 0, setup=set_configuration)),
        (S, RetSubmit(seqnum + 1, 0, 0)),
        (C, CmdSubmit(seqnum + 2, DEVID, Direction.OUT, 0, 0, setup=set_interface)),
        (S, RetSubmit(seqnum + 2, 0, 0)),
    ]


@dataclass(frozen=True, slots=True)
class LoadLayout:
    """A prefix step: the fuzz device's layout loaded into the codec's state, as the
    server gateway loads it from sysfs and the simulator from its own device."""

    def apply(self, state: ProtocolState) -> None:
        state.layout.load((parsed_configuration(),), CONFIGURATION_VALUE, {0: ISO_ALTERNATE})


Step = tuple[Role, Message] | LoadLayout


def import_steps() -> list[Step]:
    return [(C, OpRequestImport(BUSID)), (S, OpReplyImport(OpStatus.OK, device_info()))]


def _pending() -> list[tuple[Role, Message]]:
    return [(C, e) for e in pending_submits()]


# Each prefix: the conversation so far, as (sender, event), and where the layout is loaded.
SPLICE_PREFIXES: list[list[Step]] = [
    [],  # 0: op phase, nothing said
    [(C, OpRequestImport(BUSID))],  # 1: the server's IMPORT reply is next
    [(C, OpRequestDevlist())],  # 2: the server's DEVLIST reply is next
    import_steps(),  # 3: URB phase, nothing pending, only endpoint 0 known
    [*import_steps(), *enumeration_steps(), *_pending()],  # 4: URBs of every kind pending
    [*import_steps(), LoadLayout(), *_pending()],  # 5: the same, the layout loaded
]


# ------------------------------------------------------------------ Splice


@dataclass
class _SpliceRun:
    splice: Splice = field(default_factory=lambda: Splice(LIMITS))
    fed: dict[Role, int] = field(default_factory=lambda: {C: 0, S: 0})
    forwarded: dict[Role, int] = field(default_factory=lambda: {C: 0, S: 0})
    closed: dict[Role, bool] = field(default_factory=lambda: {C: False, S: False})
    failed: bool = False
    log: list[tuple[Role, object]] = field(default_factory=list)

    def feed(self, sender: Role, data: bytes) -> None:
        if self.failed or self.closed[sender]:
            return
        self.splice.receive_data(sender, data)
        self.fed[sender] += len(data)
        self.drain(sender)

    def close(self, sender: Role) -> None:
        if self.failed or self.closed[sender]:
            return
        self.splice.receive_data(sender, b"")
        self.drain(sender)

    def drain(self, sender: Role) -> None:
        splice = self.splice
        while True:
            try:
                frame = splice.next_frame(sender)
            except RemoteProtocolError:
                self.failed = True
                self.log.append((sender, "error"))
                return
            if isinstance(frame, NeedData):
                check_bounds(splice.phase, sender, splice.buffered(sender), _in_flight(splice))
                return
            if isinstance(frame.event, ConnectionClosed):
                self.closed[sender] = True
                self.log.append((sender, "closed"))
                if splice.buffered(sender):
                    raise FuzzFailure("ConnectionClosed with bytes still buffered")
                return
            self.forwarded[sender] += len(frame.raw)
            if len(frame.event.encode()) != len(frame.raw):
                raise FuzzFailure(
                    f"{type(frame.event).__name__} encodes to {len(frame.event.encode())} bytes, "
                    f"its frame had {len(frame.raw)}"
                )
            if self.forwarded[sender] + splice.buffered(sender) != self.fed[sender]:
                raise FuzzFailure(f"{sender.value}: bytes forwarded + buffered != bytes fed")
            check_bounds(splice.phase, sender, 0, _in_flight(splice))
            self.log.append((sender, frame.event))


def _splice_prefix(run: _SpliceRun, index: int) -> None:
    for step in SPLICE_PREFIXES[index]:
        if isinstance(step, LoadLayout):
            step.apply(run.splice.state)
            continue
        sender, event = step
        run.feed(sender, event.encode())
    if run.failed or run.splice.buffered(C) or run.splice.buffered(S):
        raise FuzzFailure(f"prefix {index} did not parse cleanly")


def _run_splice(prefix: int, records: list[Record], whole: bool) -> _SpliceRun:
    run = _SpliceRun()
    _splice_prefix(run, prefix)
    for record in records:
        sender = S if record.side else C
        if whole:
            if record.payload:
                run.feed(sender, record.payload)
        else:
            for piece in pieces(record):
                run.feed(sender, piece)
        if record.eof:
            run.close(sender)
        if run.failed:
            break
    return run


def fuzz_splice(data: bytes) -> None:
    """A relay's Splice: both directions, op or URB phase; chunking must not matter."""
    prefix, records = decode_input(data)
    prefix %= len(SPLICE_PREFIXES)
    chunked = _run_splice(prefix, records, whole=False)
    whole = _run_splice(prefix, records, whole=True)
    if chunked.log != whole.log:
        raise FuzzFailure(
            "read boundaries changed the frames: "
            f"{_short(chunked.log)} (in pieces) != {_short(whole.log)} (whole)"
        )


def _short(log: list[tuple[Role, object]]) -> str:
    return repr([(s.value, e if isinstance(e, str) else type(e).__name__) for s, e in log])[:500]


# ------------------------------------------------------------------ Connection, both roles


class _Params:
    """Numbers for a local action, read from its payload (zeros past the end)."""

    def __init__(self, payload: bytes) -> None:
        self._data = payload
        self._pos = 0

    def u8(self) -> int:
        value = self._data[self._pos] if self._pos < len(self._data) else 0
        self._pos += 1
        return value

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def rest(self) -> bytes:
        return self._data[self._pos :]


def _local_submit(p: _Params, seqnum: int) -> CmdSubmit:
    ep = p.u8() & 0xF
    direction = Direction(p.u8() & 1)
    raw_np = p.u8()
    np = NO_ISO_PACKETS if raw_np == 0xFF else raw_np % (LIMITS.max_iso_packets + 2)
    size = p.u16() % 600
    setup_bytes = bytes(p.u8() for _ in range(8))
    packets: tuple[IsoPacket, ...] = ()
    if np in (0, NO_ISO_PACKETS):
        length = size
    else:
        each = size // np
        length, packets = each * np, iso_packets(np, each)
    return CmdSubmit(
        seqnum=seqnum,
        devid=DEVID,
        direction=direction,
        ep=ep,
        transfer_buffer_length=length,
        number_of_packets=np,
        setup=setup_bytes,
        data=bytes(length) if direction == Direction.OUT else b"",
        iso_packets=packets,
    )


def _client_action(conn: Connection, payload: bytes, counter: Iterator[int]) -> Message:
    p = _Params(payload)
    kind = p.u8() % 4
    if kind == 0:
        return _local_submit(p, next(counter))
    if kind == 1:
        return CmdUnlink(next(counter), p.u8(), DEVID)
    if kind == 2:
        return OpRequestImport(BUSID)
    return OpRequestDevlist()


def _server_action(conn: Connection, payload: bytes, unlinks: list[int]) -> Message:
    p = _Params(payload)
    kind = p.u8() % 5
    state = conn.state
    if kind == 0:
        busid = state.requested_busid or BUSID
        return OpReplyImport(OpStatus.OK, device_info(busid))
    if kind == 1:
        return OpReplyDevlist(tuple(exported(f"1-{i + 1}", i + 2) for i in range(p.u8() % 4)))
    if kind == 2:
        return OpReplyImport(1 + p.u8() % 5)
    if kind == 3:
        if not state.pending:
            return RetSubmit(p.u16())
        urb = sorted(state.pending.values(), key=lambda u: u.seqnum)[p.u8() % len(state.pending)]
        status = -(p.u8() % 128)
        if urb.iso:
            done = [min(p.u8(), urb.transfer_buffer_length // urb.number_of_packets)] * (
                urb.number_of_packets
            )
            each = urb.transfer_buffer_length // urb.number_of_packets
            packets = tuple(IsoPacket(i * each, each, n) for i, n in enumerate(done))
            actual = sum(done)
            return RetSubmit(
                urb.seqnum,
                status,
                actual,
                number_of_packets=len(packets),
                data=bytes(actual) if urb.direction == Direction.IN else b"",
                iso_packets=packets,
            )
        actual = p.u16() % (urb.transfer_buffer_length + 1)
        return RetSubmit(
            urb.seqnum,
            status,
            actual,
            data=_in_data(urb, actual) if urb.direction == Direction.IN else b"",
        )
    seqnum = unlinks.pop(0) if unlinks else p.u16()
    return RetUnlink(seqnum, -ECONNRESET if p.u8() & 1 else 0)


def _in_data(urb: PendingUrb, actual: int) -> bytes:
    """What the device returns: its configuration descriptor (as much as fits) for a
    GET_DESCRIPTOR(configuration), so a conversation can enumerate; zeros otherwise."""
    request = urb.setup
    if (
        request is not None
        and request.request_type == 0x80
        and request.request == GET_DESCRIPTOR
        and request.value >> 8 == DESC_CONFIGURATION
    ):
        return configuration_descriptor()[:actual].ljust(actual, b"\0")
    return bytes(actual)


def _drain_connection(conn: Connection, on_event: Callable[[Event], None]) -> str | None:
    reader = conn._reader
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            return "error"
        if isinstance(event, NeedData):
            check_bounds(conn.phase, conn.their_role, reader.buffered, _in_flight(conn))
            return None
        if isinstance(event, ConnectionClosed):
            return "closed"
        check_bounds(conn.phase, conn.their_role, 0, _in_flight(conn))
        on_event(event)


# What a Connection has already said and heard before the fuzzed records.
CLIENT_PREFIXES: list[list[Step]] = [
    [(C, OpRequestDevlist())],
    [(C, OpRequestImport(BUSID))],
    import_steps(),
    [*import_steps(), *enumeration_steps(), *_pending()],
    [*import_steps(), LoadLayout(), *_pending()],
]
SERVER_PREFIXES: list[list[Step]] = [
    [],
    import_steps(),
    [*import_steps(), *enumeration_steps()],
    [*import_steps(), LoadLayout()],  # as the simulator does at import
]


def _connection_prefix(conn: Connection, steps: list[Step]) -> None:
    for step in steps:
        if isinstance(step, LoadLayout):
            step.apply(conn.state)
            continue
        sender, event = step
        if sender is conn.our_role:
            conn.send(event)
        else:
            conn.receive_data(event.encode())
            got = conn.next_event()
            if got != event:
                raise FuzzFailure(f"prefix event {event!r} came back as {got!r}")


def trace_connection(data: bytes, role: Role) -> list[tuple[str, object]]:
    """Run a Connection target; what it sent and heard, and how it ended."""
    prefix, records = decode_input(data)
    prefixes = CLIENT_PREFIXES if role is C else SERVER_PREFIXES
    conn = Connection(role, LIMITS)
    _connection_prefix(conn, prefixes[prefix % len(prefixes)])
    counter = iter(range(1000, 1 << 20))
    unlinks: list[int] = []
    trace: list[tuple[str, object]] = []

    def heard(event: Event) -> None:
        trace.append(("heard", event))
        if isinstance(event, CmdUnlink):
            unlinks.append(event.seqnum)

    for record in records:
        if record.side:
            if role is C:
                event = _client_action(conn, record.payload, counter)
            else:
                event = _server_action(conn, record.payload, unlinks)
            try:
                conn.send(event)
            except LocalProtocolError:
                # We asked for something the protocol forbids; the codec said so.
                trace.append(("refused", event))
                return trace
            trace.append(("sent", event))
            continue
        for piece in pieces(record):
            conn.receive_data(piece)
            if (end := _drain_connection(conn, heard)) is not None:
                trace.append((end, None))
                return trace
        if record.eof:
            conn.receive_data(b"")
            trace.append((_drain_connection(conn, heard) or "need-data", None))
            return trace
    return trace


def trace_splice(data: bytes) -> list[tuple[Role, object]]:
    """Run the Splice target; every frame's event, "error" or "closed", in order."""
    prefix, records = decode_input(data)
    return _run_splice(prefix % len(SPLICE_PREFIXES), records, whole=False).log


def fuzz_client_connection(data: bytes) -> None:
    """The importer's Connection (usbip, vhci): server bytes in, its own URBs out."""
    trace_connection(data, C)


def fuzz_server_connection(data: bytes) -> None:
    """The exporter's Connection (the simulator): client bytes in, its replies out."""
    trace_connection(data, S)


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "splice": fuzz_splice,
    "client_connection": fuzz_client_connection,
    "server_connection": fuzz_server_connection,
}
