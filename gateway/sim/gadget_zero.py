"""Devices modelled on Linux's Gadget Zero (drivers/usb/gadget/function/f_sourcesink.c
and f_loopback.c), with g_zero's VID:PID so the kernel's `usbtest` driver binds."""

from __future__ import annotations

import enum

from ..protocol import Direction, IsoPacket, Setup, TransferType
from .descriptors import ConfigurationDescriptor, EndpointDescriptor, InterfaceDescriptor
from .device import OK, SimDevice
from .fifo import ChunkFifo
from .urb import EPIPE, STALL, Urb, UrbResult

GADGET_ZERO_VID = 0x0525  # NetChip, as g_zero uses
GADGET_ZERO_PID = 0xA4A0
VENDOR_CLASS = 0xFF
MANUFACTURER = "usbip-gateway"

# usbtest case 14 (ctrl_out) writes with 0x5b and reads back with 0x5c.
REQ_CTRL_WRITE = 0x5B
REQ_CTRL_READ = 0x5C
CTRL_BUFFER_SIZE = 4096  # USB_COMP_EP0_BUFSIZ

_ISO_FRAME_MASK = 0x3FF  # frame numbers wrap like a USB frame counter


class Pattern(enum.IntEnum):
    """f_sourcesink's `pattern` parameter, matching usbtest's."""

    ZEROS = 0
    MOD63 = 1  # byte i of each packet is i % 63
    NONE = 2  # the source sends whatever; the sink checks nothing


class PatternBuffer:
    """Precomputed source data, so a 64 KiB URB costs a slice, not a Python loop."""

    def __init__(self, pattern: Pattern, packet_size: int) -> None:
        self.pattern = pattern
        self.packet_size = packet_size
        self._buf = b""

    def take(self, length: int) -> bytes:
        if length > len(self._buf):
            self._grow(max(length, 2 * len(self._buf), 64 * 1024))
        return self._buf if length == len(self._buf) else self._buf[:length]

    def matches(self, data: bytes) -> bool:
        return self.pattern == Pattern.NONE or data == self.take(len(data))

    def _grow(self, length: int) -> None:
        if self.pattern == Pattern.MOD63:
            # usbtest and f_sourcesink restart the count at every packet boundary.
            packet = bytes(i % 63 for i in range(self.packet_size))
            self._buf = (packet * -(-length // self.packet_size))[:length]
        else:
            self._buf = bytes(length)


def _bulk_pair() -> tuple[EndpointDescriptor, EndpointDescriptor]:
    return (
        EndpointDescriptor(0x81, TransferType.BULK, 512, fs_max_packet_size=64),
        EndpointDescriptor(0x01, TransferType.BULK, 512, fs_max_packet_size=64),
    )


def _iso_pair() -> tuple[EndpointDescriptor, EndpointDescriptor]:
    # f_sourcesink's defaults: isoc_maxpacket 1024, isoc_interval 4 (every 8 microframes).
    return (
        EndpointDescriptor(
            0x82, TransferType.ISOCHRONOUS, 1024, 4, fs_max_packet_size=1023, fs_interval=4
        ),
        EndpointDescriptor(
            0x02, TransferType.ISOCHRONOUS, 1024, 4, fs_max_packet_size=1023, fs_interval=4
        ),
    )


class _ControlBuffer:
    """f_sourcesink's vendor requests 0x5b/0x5c: a buffer written, then read back."""

    def __init__(self) -> None:
        self.data = bytearray(CTRL_BUFFER_SIZE)

    def handle(self, setup: Setup, data: bytes) -> UrbResult | None:
        if setup.kind != 2 or setup.value or setup.index or setup.length > len(self.data):
            return None
        if setup.request == REQ_CTRL_WRITE and setup.request_type == 0x40:
            self.data[: len(data)] = data
            return OK
        if setup.request == REQ_CTRL_READ and setup.request_type == 0xC0:
            return UrbResult(data=bytes(self.data[: setup.length]))
        return None


class SourceSink(SimDevice):
    """Bulk IN sends the pattern, bulk OUT checks it. Alternate 1 adds isochronous
    endpoints, like f_sourcesink's isoc alternate setting.

    A sink pattern mismatch halts the OUT endpoint and fails the URB with -EPIPE, as
    f_sourcesink halts its endpoint; CLEAR_FEATURE(HALT) recovers.
    """

    def __init__(
        self,
        *,
        busid: str = "1-1",
        devnum: int = 2,
        busnum: int = 1,
        serial: str = "SIM-SS-0001",
        pattern: Pattern | int = Pattern.ZEROS,
        isochronous: bool = True,
    ) -> None:
        alternates = [InterfaceDescriptor(0, 0, VENDOR_CLASS, endpoints=_bulk_pair())]
        if isochronous:
            alternates.append(
                InterfaceDescriptor(0, 1, VENDOR_CLASS, endpoints=_bulk_pair() + _iso_pair())
            )
        super().__init__(
            busid=busid,
            busnum=busnum,
            devnum=devnum,
            vendor_id=GADGET_ZERO_VID,
            product_id=GADGET_ZERO_PID,
            device_class=VENDOR_CLASS,
            manufacturer=MANUFACTURER,
            product="Gadget Zero source/sink (simulated)",
            serial=serial,
            configurations=[ConfigurationDescriptor(1, tuple(alternates))],
        )
        self.pattern = Pattern(pattern)
        self.control_buffer = _ControlBuffer()
        self._patterns: dict[int, PatternBuffer] = {}
        self._frame = 0

    def pattern_for(self, endpoint: EndpointDescriptor) -> PatternBuffer:
        size = endpoint.packet_size(self.high_speed)
        buffer = self._patterns.get(size)
        if buffer is None:
            buffer = self._patterns[size] = PatternBuffer(self.pattern, size)
        return buffer

    async def handle_control(self, setup: Setup, data: bytes) -> UrbResult | None:
        return self.control_buffer.handle(setup, data)

    async def handle_transfer(self, urb: Urb, endpoint: EndpointDescriptor) -> UrbResult:
        iso_endpoint = endpoint.transfer_type == TransferType.ISOCHRONOUS
        if iso_endpoint != urb.is_iso:
            return STALL
        pattern = self.pattern_for(endpoint)
        if urb.is_iso:
            return self._isochronous(urb, pattern)
        if urb.direction == Direction.IN:
            return UrbResult(data=pattern.take(urb.length))
        if not pattern.matches(urb.data):
            self.halted.add(urb.address)
            return UrbResult(status=-EPIPE)
        return OK

    def _isochronous(self, urb: Urb, pattern: PatternBuffer) -> UrbResult:
        # Every packet is delivered in full at once: no pacing, so benchmarks measure
        # the path, not a simulated bus. ISO OUT data is accepted unchecked.
        self._frame = (self._frame + len(urb.iso_packets)) & _ISO_FRAME_MASK
        if urb.direction == Direction.IN:
            packets = tuple(IsoPacket(p.offset, p.length, p.length, 0) for p in urb.iso_packets)
            data = b"".join(pattern.take(p.length) for p in urb.iso_packets)
            return UrbResult(data=data, iso_packets=packets, start_frame=self._frame)
        packets = tuple(IsoPacket(p.offset, p.length, p.length, 0) for p in urb.iso_packets)
        return UrbResult(
            actual_length=sum(p.length for p in packets),
            iso_packets=packets,
            start_frame=self._frame,
        )


class Loopback(SimDevice):
    """What is written to bulk OUT is read back from bulk IN, chunk by chunk, like
    f_loopback. An IN URB stays pending until data is there (so it can be unlinked);
    an OUT URB stays pending while `capacity` bytes wait to be read."""

    def __init__(
        self,
        *,
        busid: str = "1-2",
        devnum: int = 3,
        busnum: int = 1,
        serial: str = "SIM-LB-0001",
        capacity: int = 1024 * 1024,
    ) -> None:
        self.fifo = ChunkFifo(capacity)  # before super().__init__, which calls reset()
        super().__init__(
            busid=busid,
            busnum=busnum,
            devnum=devnum,
            vendor_id=GADGET_ZERO_VID,
            product_id=GADGET_ZERO_PID,
            device_class=VENDOR_CLASS,
            manufacturer=MANUFACTURER,
            product="Gadget Zero loopback (simulated)",
            serial=serial,
            configurations=[
                ConfigurationDescriptor(
                    1, (InterfaceDescriptor(0, 0, VENDOR_CLASS, endpoints=_bulk_pair()),)
                )
            ],
        )
        self.control_buffer = _ControlBuffer()

    def reset(self) -> None:
        super().reset()
        self.fifo.clear()

    async def handle_control(self, setup: Setup, data: bytes) -> UrbResult | None:
        return self.control_buffer.handle(setup, data)

    async def handle_transfer(self, urb: Urb, endpoint: EndpointDescriptor) -> UrbResult:
        if urb.is_iso:
            return STALL
        if urb.direction == Direction.IN:
            return UrbResult(data=await self.fifo.get(urb.length))
        await self.fifo.put(urb.data)
        return OK
