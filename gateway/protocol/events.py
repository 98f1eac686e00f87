"""Typed, immutable, self-validating USB/IP messages, each able to encode itself.

Decoding needs connection state (a RET_SUBMIT's length depends on the CMD_SUBMIT it
answers), so it lives in `connection.py`; encoding does not, so it lives here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import (
    BUSID_SIZE,
    ISO_DESCRIPTOR,
    OP_HEADER,
    URB_HEADER_SIZE,
    USBIP_VERSION,
    Direction,
    OpCode,
    OpStatus,
    UrbCommand,
)
from .errors import LocalProtocolError
from .records import DeviceInfo, ExportedDevice, check_busid, encode_cstring

CMD_SUBMIT_HEADER = struct.Struct(">IIIIIIiiIi8s")
RET_SUBMIT_HEADER = struct.Struct(">IIIIIiiiIi8x")
CMD_UNLINK_HEADER = struct.Struct(">IIIIII24x")
RET_UNLINK_HEADER = struct.Struct(">IIIIIi24x")
assert CMD_SUBMIT_HEADER.size == RET_SUBMIT_HEADER.size == URB_HEADER_SIZE
assert CMD_UNLINK_HEADER.size == RET_UNLINK_HEADER.size == URB_HEADER_SIZE

_U32 = 0xFFFFFFFF
_OUT = Direction.OUT  # per URB: a plain name, not an Enum class attribute (protocol.state)
_S32_MIN, _S32_MAX = -(2**31), 2**31 - 1


def _check_u32(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not 0 <= value <= _U32:
            raise LocalProtocolError(f"{owner}.{name}={value} is not a u32")


def _check_s32(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not _S32_MIN <= value <= _S32_MAX:
            raise LocalProtocolError(f"{owner}.{name}={value} is not an s32")


# ---------------------------------------------------------------- op phase


@dataclass(frozen=True, slots=True)
class OpRequestDevlist:
    def encode(self) -> bytes:
        return OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_DEVLIST, 0)


@dataclass(frozen=True, slots=True)
class OpReplyDevlist:
    devices: tuple[ExportedDevice, ...] = ()
    status: int = OpStatus.OK

    def __post_init__(self) -> None:
        _check_u32("OpReplyDevlist", status=self.status)
        if self.status != OpStatus.OK and self.devices:
            raise LocalProtocolError("a failed DEVLIST reply carries no devices")

    def encode(self) -> bytes:
        head = OP_HEADER.pack(USBIP_VERSION, OpCode.REP_DEVLIST, self.status)
        if self.status != OpStatus.OK:
            return head  # the tools stop reading at a non-OK status
        body = b"".join(d.encode() for d in self.devices)
        return head + struct.pack(">I", len(self.devices)) + body


@dataclass(frozen=True, slots=True)
class OpRequestImport:
    busid: str

    def __post_init__(self) -> None:
        if reason := check_busid(self.busid):
            raise LocalProtocolError(reason)

    def encode(self) -> bytes:
        return OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_IMPORT, 0) + encode_cstring(
            self.busid, BUSID_SIZE, "busid"
        )


@dataclass(frozen=True, slots=True)
class OpReplyImport:
    """A device record follows the header only on success."""

    status: int
    device: DeviceInfo | None = None

    def __post_init__(self) -> None:
        _check_u32("OpReplyImport", status=self.status)
        if (self.status == OpStatus.OK) != (self.device is not None):
            raise LocalProtocolError("an IMPORT reply has a device record exactly when OK")

    def encode(self) -> bytes:
        head = OP_HEADER.pack(USBIP_VERSION, OpCode.REP_IMPORT, self.status)
        return head if self.device is None else head + self.device.encode()


# ---------------------------------------------------------------- URB phase


@dataclass(frozen=True, slots=True)
class IsoPacket:
    """usbip_iso_packet_descriptor: one per ISO packet, after the data."""

    offset: int
    length: int
    actual_length: int = 0
    status: int = 0

    def __post_init__(self) -> None:
        _check_u32("IsoPacket", offset=self.offset, length=self.length)
        _check_s32("IsoPacket", actual_length=self.actual_length, status=self.status)

    def encode(self) -> bytes:
        return ISO_DESCRIPTOR.pack(self.offset, self.length, self.actual_length, self.status)


def encode_iso(packets: tuple[IsoPacket, ...]) -> bytes:
    return b"".join(p.encode() for p in packets)


@dataclass(frozen=True, slots=True)
class CmdSubmit:
    """A URB from the importer. OUT carries `transfer_buffer_length` bytes of data."""

    seqnum: int
    devid: int
    direction: Direction
    ep: int
    transfer_buffer_length: int
    transfer_flags: int = 0
    start_frame: int = 0
    # 0 or NO_ISO_PACKETS for non-ISO URBs; kept as received so bytes are unchanged.
    number_of_packets: int = 0
    interval: int = 0
    setup: bytes = bytes(8)
    data: bytes = b""
    iso_packets: tuple[IsoPacket, ...] = field(default=())
    # Read by a cut-through `Splice`: `data` is left empty, the frame's bytes carry it
    # (and the `Payload` frames after it, if it had not all arrived). Never encoded.
    cut_through: bool = False

    def __post_init__(self) -> None:
        # One chained test on the per-URB path; the checks name the culprit on failure.
        if not (
            0 <= self.seqnum <= _U32
            and 0 <= self.devid <= _U32
            and 0 <= self.transfer_flags <= _U32
            and 0 <= self.number_of_packets <= _U32
            and _S32_MIN <= self.start_frame <= _S32_MAX
            and _S32_MIN <= self.interval <= _S32_MAX
        ):
            _check_u32(
                "CmdSubmit",
                seqnum=self.seqnum,
                devid=self.devid,
                transfer_flags=self.transfer_flags,
                number_of_packets=self.number_of_packets,
            )
            _check_s32("CmdSubmit", start_frame=self.start_frame, interval=self.interval)
        if type(self.direction) is not Direction:
            if self.direction not in (Direction.OUT, Direction.IN):
                raise LocalProtocolError(f"direction {self.direction} is neither OUT nor IN")
            # A plain 0 or 1 is accepted; store the enum so `.name` works downstream.
            object.__setattr__(self, "direction", Direction(self.direction))
        if not 0 <= self.ep <= 15:
            raise LocalProtocolError(f"endpoint {self.ep} is not 0..15")
        if not 0 <= self.transfer_buffer_length <= _S32_MAX:
            raise LocalProtocolError("transfer_buffer_length must be 0..2**31-1")
        if len(self.setup) != 8:
            raise LocalProtocolError("setup must be 8 bytes")
        expected = self.transfer_buffer_length if self.direction == _OUT else 0
        if len(self.data) != expected and not (self.cut_through and not self.data):
            raise LocalProtocolError(
                f"CMD_SUBMIT {self.direction.name} carries {expected} data bytes, "
                f"not {len(self.data)}"
            )
        if self.iso_packets and self.number_of_packets != len(self.iso_packets):
            raise LocalProtocolError("number_of_packets must count the ISO descriptors")

    def encode(self) -> bytes:
        if self.cut_through:
            raise LocalProtocolError("a cut-through frame is passed on as read, not encoded")
        head = CMD_SUBMIT_HEADER.pack(
            UrbCommand.CMD_SUBMIT,
            self.seqnum,
            self.devid,
            self.direction,
            self.ep,
            self.transfer_flags,
            self.transfer_buffer_length,
            self.start_frame,
            self.number_of_packets,
            self.interval,
            self.setup,
        )
        if self.iso_packets:
            return b"".join((head, self.data, encode_iso(self.iso_packets)))
        return head + self.data if self.data else head


@dataclass(frozen=True, slots=True)
class RetSubmit:
    """A completed URB. IN carries `actual_length` bytes (ISO IN: packed, no gaps)."""

    seqnum: int
    status: int = 0
    actual_length: int = 0
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0
    data: bytes = b""
    iso_packets: tuple[IsoPacket, ...] = field(default=())
    # The kernel sends zeros here; kept so a relay changes no byte it need not.
    devid: int = 0
    direction: int = 0
    ep: int = 0
    # As CmdSubmit's, for IN data.
    cut_through: bool = False

    def __post_init__(self) -> None:
        if not (
            0 <= self.seqnum <= _U32
            and 0 <= self.number_of_packets <= _U32
            and 0 <= self.devid <= _U32
            and 0 <= self.direction <= _U32
            and 0 <= self.ep <= _U32
            and _S32_MIN <= self.status <= _S32_MAX
            and _S32_MIN <= self.start_frame <= _S32_MAX
            and _S32_MIN <= self.error_count <= _S32_MAX
        ):
            _check_u32(
                "RetSubmit",
                seqnum=self.seqnum,
                number_of_packets=self.number_of_packets,
                devid=self.devid,
                direction=self.direction,
                ep=self.ep,
            )
            _check_s32(
                "RetSubmit",
                status=self.status,
                start_frame=self.start_frame,
                error_count=self.error_count,
            )
        if not 0 <= self.actual_length <= _S32_MAX:
            raise LocalProtocolError("actual_length must be 0..2**31-1")
        if self.data and len(self.data) != self.actual_length:
            raise LocalProtocolError("RET_SUBMIT data must be actual_length bytes, or none")
        if self.iso_packets and self.number_of_packets != len(self.iso_packets):
            raise LocalProtocolError("number_of_packets must count the ISO descriptors")

    def encode(self) -> bytes:
        if self.cut_through:
            raise LocalProtocolError("a cut-through frame is passed on as read, not encoded")
        head = RET_SUBMIT_HEADER.pack(
            UrbCommand.RET_SUBMIT,
            self.seqnum,
            self.devid,
            self.direction,
            self.ep,
            self.status,
            self.actual_length,
            self.start_frame,
            self.number_of_packets,
            self.error_count,
        )
        if self.iso_packets:
            return b"".join((head, self.data, encode_iso(self.iso_packets)))
        return head + self.data if self.data else head


@dataclass(frozen=True, slots=True)
class CmdUnlink:
    seqnum: int
    unlink_seqnum: int
    devid: int = 0
    direction: int = 0
    ep: int = 0

    def __post_init__(self) -> None:
        _check_u32(
            "CmdUnlink",
            seqnum=self.seqnum,
            unlink_seqnum=self.unlink_seqnum,
            devid=self.devid,
            direction=self.direction,
            ep=self.ep,
        )

    def encode(self) -> bytes:
        return CMD_UNLINK_HEADER.pack(
            UrbCommand.CMD_UNLINK,
            self.seqnum,
            self.devid,
            self.direction,
            self.ep,
            self.unlink_seqnum,
        )


@dataclass(frozen=True, slots=True)
class RetUnlink:
    """-ECONNRESET: the URB was pending and gets no RET_SUBMIT; 0: it had completed."""

    seqnum: int
    status: int = 0
    devid: int = 0
    direction: int = 0
    ep: int = 0

    def __post_init__(self) -> None:
        _check_u32(
            "RetUnlink", seqnum=self.seqnum, devid=self.devid, direction=self.direction, ep=self.ep
        )
        _check_s32("RetUnlink", status=self.status)

    def encode(self) -> bytes:
        return RET_UNLINK_HEADER.pack(
            UrbCommand.RET_UNLINK, self.seqnum, self.devid, self.direction, self.ep, self.status
        )


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end at a frame boundary."""


@dataclass(frozen=True, slots=True)
class Payload:
    """More of a cut-through frame's data, in `Frame.raw` (only a `Splice` makes these)."""


OpEvent = OpRequestDevlist | OpReplyDevlist | OpRequestImport | OpReplyImport
UrbEvent = CmdSubmit | RetSubmit | CmdUnlink | RetUnlink
Event = OpEvent | UrbEvent | ConnectionClosed
