"""Builders shared by the codec tests: devices, descriptors, and conversation runners."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, settings

from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    DeviceInfo,
    Direction,
    Event,
    ExportedDevice,
    InterfaceInfo,
    Limits,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    Phase,
    RetSubmit,
    Role,
    Speed,
    Splice,
)

settings.register_profile(
    "protocol-ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("protocol-thorough", max_examples=1000, deadline=None, print_blob=True)
# One object, used as a decorator, so these tests never change the global profile.
PROFILE = settings.get_profile(os.environ.get("USBIP_GW_PROTOCOL_PROFILE", "protocol-ci"))

BUSID = "1-1.4"
BUSNUM, DEVNUM = 3, 7
DEVID = (BUSNUM << 16) | DEVNUM


def device(
    busid: str = BUSID,
    *,
    busnum: int = BUSNUM,
    devnum: int = DEVNUM,
    num_interfaces: int = 1,
    configuration_value: int = 1,
) -> DeviceInfo:
    return DeviceInfo(
        path=f"/sys/devices/pci0000:00/0000:00:14.0/usb{busnum}/{busid}",
        busid=busid,
        busnum=busnum,
        devnum=devnum,
        speed=Speed.HIGH,
        id_vendor=0x1D6B,
        id_product=0x0104,
        bcd_device=0x0100,
        device_class=0xEF,
        device_subclass=2,
        device_protocol=1,
        configuration_value=configuration_value,
        num_configurations=1,
        num_interfaces=num_interfaces,
    )


def exported(busid: str, n_interfaces: int, busnum: int = 1, devnum: int = 2) -> ExportedDevice:
    info = device(busid, busnum=busnum, devnum=devnum, num_interfaces=n_interfaces)
    interfaces = tuple(InterfaceInfo(0xFF, i, i + 1) for i in range(n_interfaces))
    return ExportedDevice(info, interfaces)


# ------------------------------------------------------------ USB descriptors

EndpointSpec = tuple[int, int]  # bEndpointAddress, bmAttributes
AltSpec = tuple[int, int, Sequence[EndpointSpec]]  # bInterfaceNumber, bAlternateSetting, eps


def config_descriptor(value: int, alts: Iterable[AltSpec]) -> bytes:
    """A whole configuration descriptor set, as GET_DESCRIPTOR(configuration) returns."""
    body = b""
    interfaces = set()
    for number, alternate, endpoints in alts:
        interfaces.add(number)
        body += bytes([9, 4, number, alternate, len(endpoints), 0x01, 0x02, 0x00, 0])
        for address, attributes in endpoints:
            body += bytes([7, 5, address, attributes]) + struct.pack("<H", 192) + bytes([1])
    total = 9 + len(body)
    head = struct.pack("<BBHBBBBB", 9, 2, total, len(interfaces), value, 0, 0x80, 50)
    return head + body


# The device the codec tests import: every endpoint number in both directions, so that
# any URB a test makes has an endpoint; the type decides the framing.
BULK_EPS = range(1, 8)
ISO_EPS = range(8, 12)
INTERRUPT_EPS = range(12, 16)
TEST_CONFIG_VALUE = 1
TEST_CONFIG = config_descriptor(
    TEST_CONFIG_VALUE,
    [
        (
            0,
            0,
            [(n, 0x02) for n in BULK_EPS]
            + [(0x80 | n, 0x02) for n in BULK_EPS]
            + [(n, 0x01) for n in ISO_EPS]
            + [(0x80 | n, 0x05) for n in ISO_EPS]
            + [(n, 0x03) for n in INTERRUPT_EPS]
            + [(0x80 | n, 0x03) for n in INTERRUPT_EPS],
        )
    ],
)
# Seqnums of the enumeration URBs; strategies draw theirs below this.
ENUMERATION_SEQNUM = 0xFFFFFF00


def enumeration_steps(devid: int, config: bytes = TEST_CONFIG) -> list[tuple[Role, Event]]:
    """GET_DESCRIPTOR(configuration) and SET_CONFIGURATION, answered: the layout is known."""
    get = get_config_setup(len(config))
    setc = setup_packet(0x00, 0x09, config[5], 0, 0)
    seq = ENUMERATION_SEQNUM
    return [
        (Role.CLIENT, CmdSubmit(seq, devid, Direction.IN, 0, len(config), setup=get)),
        (Role.SERVER, RetSubmit(seq, 0, len(config), data=config)),
        (Role.CLIENT, CmdSubmit(seq + 1, devid, Direction.OUT, 0, 0, setup=setc)),
        (Role.SERVER, RetSubmit(seq + 1, 0, 0)),
    ]


def setup_packet(request_type: int, request: int, value: int, index: int, length: int) -> bytes:
    return struct.pack("<BBHHH", request_type, request, value, index, length)


def get_config_setup(length: int) -> bytes:
    return setup_packet(0x80, 0x06, 0x0200, 0, length)


def set_interface_setup(interface: int, alternate: int) -> bytes:
    return setup_packet(0x01, 0x0B, alternate, interface, 0)


# ------------------------------------------------------------ conversations


@dataclass
class Trio:
    """A client Connection, a server Connection and a Splice watching the same bytes."""

    client: Connection
    server: Connection
    splice: Splice

    @classmethod
    def new(cls, limits: Limits | None = None, *, cut_through: bool = False) -> Trio:
        return cls(
            Connection(Role.CLIENT, limits),
            Connection(Role.SERVER, limits),
            Splice(limits, cut_through=cut_through),
        )

    def end(self, role: Role) -> Connection:
        return self.client if role is Role.CLIENT else self.server

    def exchange(self, sender: Role, event: Event) -> bytes:
        """`sender` sends `event`; the splice and the receiver must see exactly it."""
        raw = self.end(sender).send(event)
        assert raw == event.encode()
        self.splice.receive_data(sender, raw)
        frame = self.splice.next_frame(sender)
        assert frame is not NEED_DATA
        assert frame.event == event  # type: ignore[union-attr]
        assert frame.raw == raw  # type: ignore[union-attr]
        assert self.splice.next_frame(sender) is NEED_DATA
        receiver = self.end(sender.peer)
        receiver.receive_data(raw)
        decoded = receiver.next_event()
        assert decoded == event
        assert decoded.encode() == raw  # type: ignore[union-attr]
        assert receiver.next_event() is NEED_DATA
        return raw

    def import_device(
        self, info: DeviceInfo | None = None, *, enumerate: bool = True
    ) -> DeviceInfo:
        info = info or device()
        self.exchange(Role.CLIENT, OpRequestImport(info.busid))
        self.exchange(Role.SERVER, OpReplyImport(OpStatus.OK, info))
        for phase in (self.client.phase, self.server.phase, self.splice.phase):
            assert phase is Phase.URB
        if enumerate:
            for sender, event in enumeration_steps(info.devid):
                self.exchange(sender, event)
        return info


def imported_trio(
    limits: Limits | None = None,
    info: DeviceInfo | None = None,
    *,
    enumerate: bool = True,
    cut_through: bool = False,
) -> Trio:
    trio = Trio.new(limits, cut_through=cut_through)
    trio.import_device(info, enumerate=enumerate)
    return trio


def drain(conn: Connection) -> list[Event]:
    """Every event a Connection can produce from what it has buffered."""
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)  # type: ignore[arg-type]
    return events


def drain_frames(splice: Splice, sender: Role) -> list[tuple[Event, bytes]]:
    frames = []
    while (frame := splice.next_frame(sender)) is not NEED_DATA:
        frames.append((frame.event, frame.raw))  # type: ignore[union-attr]
    return frames


def chunked(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` split at the given offsets (clamped, sorted, duplicates dropped)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


Splitter = Callable[[bytes], list[bytes]]


def run_split(steps: Sequence[tuple[Role, Event]], split: Splitter) -> Trio:
    """Each run of messages from one sender is sent, then fed to its peer and the splice
    in the pieces `split` makes; both must produce exactly the messages, in order."""
    trio = Trio.new()
    for sender, group in itertools.groupby(steps, key=lambda step: step[0]):
        events = [event for _, event in group]
        raws = [trio.end(sender).send(event) for event in events]
        receiver = trio.end(sender.peer)
        got, frames = [], []
        for piece in split(b"".join(raws)):
            assert piece
            receiver.receive_data(piece)
            got += drain(receiver)
            trio.splice.receive_data(sender, piece)
            frames += drain_frames(trio.splice, sender)
        assert got == events
        assert frames == list(zip(events, raws, strict=True))
        assert trio.splice.buffered(sender) == 0
    return trio
