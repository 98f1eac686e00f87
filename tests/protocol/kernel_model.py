"""How usbip-host reads a client's byte stream: a model written from Debian's 6.1 sources.

Only what decides where one command ends and the next begins (docs/wire-framing.md
cites each rule's file and line): `stub_rx_pdu` reads a 48-byte header, checks the devid
and the command, and for a CMD_SUBMIT asks `get_pipe()` for the endpoint on the device.
Without one it returns having read nothing more, and the next 48 bytes are the next
header. With one it reads the transfer buffer only for OUT pipes (`usbip_recv_xbuff`)
and ISO descriptors only for isochronous pipes (`usbip_recv_iso`). Errors that make the
stub drop the connection end the model's reading ("closed").

The device is a configuration of interfaces with alt settings; SET_CONFIGURATION and
SET_INTERFACE take effect as the stub reads them (`tweak_special_requests`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# (bInterfaceNumber, bAlternateSetting, ((bEndpointAddress, bmAttributes), ...))
AltSpec = tuple[int, int, tuple[tuple[int, int], ...]]

_HEADER = struct.Struct(">IIIIIIiiii8s")
_ISO = struct.Struct(">IIii")
USBIP_MAX_ISO_PACKETS = 1024
URB_DMA_MAP_SG = 0x00040000
KMALLOC_MAX = 4 * 1024 * 1024  # x86-64, MAX_ORDER 11: a larger kzalloc fails


@dataclass
class StubModel:
    """One imported device as usbip-host holds it, reading one connection."""

    devid: int
    configurations: dict[int, tuple[AltSpec, ...]]
    active: int
    alternates: dict[int, int] = field(default_factory=dict)
    frames: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each
    closed: str | None = None  # why the stub dropped the connection, if it did

    def _endpoint_type(self, epnum: int, direction: int) -> int | None:
        """`get_pipe`: udev->ep_in[] for direction 1, ep_out[] for anything else."""
        if epnum == 0:
            return 0  # ep0, a control endpoint, in both arrays
        config = self.configurations.get(self.active)
        if config is None:
            return None
        want_in = direction == 1
        for interface, alternate, endpoints in config:
            if alternate != self.alternates.get(interface, 0):
                continue
            for address, attributes in endpoints:
                kind = attributes & 3
                if address & 0x0F != epnum:
                    continue
                if kind == 0 or bool(address & 0x80) == want_in:
                    return kind
        return None

    def _tweak(self, setup: bytes) -> None:
        request_type, request, value, index, _ = struct.unpack("<BBHHH", setup)
        if request == 0x0B and request_type == 0x01:  # SET_INTERFACE
            config = self.configurations.get(self.active)
            if config and any(i == index and a == value for i, a, _ in config):
                self.alternates[index] = value
        elif (
            request == 0x09 and request_type == 0x00 and (value in self.configurations or not value)
        ):
            self.active = value  # SET_CONFIGURATION
            self.alternates = {}

    def read(self, stream: bytes) -> None:
        """Consume `stream` as stub_rx does, recording each command's extent."""
        pos = 0
        while self.closed is None and len(stream) - pos >= 48:
            start = pos
            (command, _seq, devid, direction, ep, flags, length, _sf, np, _iv, setup) = (
                _HEADER.unpack_from(stream, pos)
            )
            pos += 48
            if devid != self.devid:
                self.closed = "invalid request (devid)"
                break
            if command == 2:  # CMD_UNLINK
                self.frames.append((start, pos))
                continue
            if command != 1:
                self.closed = "unknown pdu"
                break
            kind = self._endpoint_type(ep if ep <= 0x7FFFFFFF else -1, direction)
            np_signed = np - (1 << 32) if np & 0x80000000 else np
            if kind == 1 and not 0 <= np_signed <= USBIP_MAX_ISO_PACKETS:
                kind = None  # get_pipe: isoc invalid num packets
            if kind is None:
                self.frames.append((start, pos))  # nothing more is read
                continue
            if flags & URB_DMA_MAP_SG and length == 0:
                self.closed = "sg buffer with zero length"
                break
            if length < 0 or (length > KMALLOC_MAX and not flags & URB_DMA_MAP_SG):
                self.closed = "buffer allocation failed"
                break
            out = direction != 1
            if out and length > 0:
                if len(stream) - pos < length:
                    pos = start
                    break
                pos += length
            if kind == 1 and np_signed > 0:
                size = np_signed * _ISO.size
                if len(stream) - pos < size:
                    pos = start
                    break
                total = sum(_ISO.unpack_from(stream, pos + i * 16)[2] for i in range(np_signed))
                pos += size
                if total != 0:
                    self.closed = "iso packet lengths do not add up"
                    break
            if kind == 1 and np_signed == 0:
                self.closed = "usb_submit_urb: isochronous URB without packets"
                self.frames.append((start, pos))
                break
            self.frames.append((start, pos))
            if ep == 0:
                self._tweak(setup)


@dataclass
class VhciUrb:
    """What vhci-hcd keeps of a URB it submitted: its pipe and buffer."""

    is_in: bool
    iso: bool
    number_of_packets: int
    transfer_buffer_length: int


@dataclass
class VhciModel:
    """vhci-hcd reading a server's replies (`vhci_rx.c`, `usbip_common.c`)."""

    pending: dict[int, VhciUrb]
    frames: list[tuple[int, int]] = field(default_factory=list)
    closed: str | None = None

    def read(self, stream: bytes) -> None:
        pos = 0
        while self.closed is None and len(stream) - pos >= 48:
            start = pos
            command, seqnum, _, _, _, status, actual, _sf, np, _ec = struct.unpack_from(
                ">IIIIIiiiii", stream, pos
            )
            del status
            pos += 48
            if command == 4:  # RET_UNLINK: nothing follows
                self.frames.append((start, pos))
                continue
            if command != 3:
                self.closed = "unknown pdu"
                break
            urb = self.pending.pop(seqnum, None)
            if urb is None:
                self.closed = "cannot find a urb"
                break
            if urb.is_in and actual > 0:  # usbip_recv_xbuff
                if actual > urb.transfer_buffer_length:
                    self.closed = "recv xbuf (longer than the buffer)"
                    break
                if len(stream) - pos < actual:
                    pos = start
                    break
                pos += actual
            if urb.iso:  # usbip_pack_ret_submit clamps, usbip_recv_iso reads
                count = np if 0 <= np <= urb.number_of_packets else 0
                if count:
                    if len(stream) - pos < 16 * count:
                        pos = start
                        break
                    total = sum(_ISO.unpack_from(stream, pos + 16 * i)[2] for i in range(count))
                    pos += 16 * count
                    if total != actual:
                        self.closed = "iso packet lengths do not add up"
                        break
            self.frames.append((start, pos))
