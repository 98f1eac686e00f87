"""USB descriptors, read as usbcore reads them (drivers/usb/core/config.c).

The kernel frames a CMD_SUBMIT by the endpoint as usbcore keeps it, so the gateway
must know the same set of endpoints: the rules by which usbcore skips an endpoint
descriptor are followed here, and what they do not cover marks a configuration
irregular (see docs/wire-framing.md). Descriptors that cannot be parsed teach nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import TransferType

# bmRequestType / bRequest of the standard requests that change what endpoints exist.
GET_DESCRIPTOR = 0x06
SET_CONFIGURATION = 0x09
SET_INTERFACE = 0x0B
DESC_DEVICE = 0x01
DESC_CONFIGURATION = 0x02
DESC_INTERFACE = 0x04
DESC_ENDPOINT = 0x05

_SETUP = struct.Struct("<BBHHH")


@dataclass(frozen=True, slots=True)
class Setup:
    """An 8-byte control SETUP packet (little-endian, unlike the rest of USB/IP)."""

    request_type: int
    request: int
    value: int
    index: int
    length: int

    @classmethod
    def decode(cls, raw: bytes) -> Setup:
        return cls(*_SETUP.unpack(raw))

    def encode(self) -> bytes:
        return _SETUP.pack(self.request_type, self.request, self.value, self.index, self.length)

    @property
    def is_in(self) -> bool:
        return bool(self.request_type & 0x80)

    @property
    def kind(self) -> int:
        """0 standard, 1 class, 2 vendor."""
        return (self.request_type >> 5) & 0x3

    @property
    def recipient(self) -> int:
        """0 device, 1 interface, 2 endpoint."""
        return self.request_type & 0x1F


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: int  # bit 7: IN
    attributes: int
    max_packet_size: int
    interval: int

    @property
    def transfer_type(self) -> TransferType:
        return TransferType(self.attributes & 0x3)

    @property
    def number(self) -> int:
        return self.address & 0x0F


@dataclass(frozen=True, slots=True)
class AltSetting:
    interface: int
    alternate: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Configuration:
    """One configuration as usbcore keeps it (drivers/usb/core/config.c).

    `irregular` says why usbcore's reading of the descriptors cannot be predicted (then
    no endpoint but 0 may be used through the gateway); None when it can.
    """

    value: int
    num_interfaces: int
    alts: tuple[AltSetting, ...]
    irregular: str | None = None


# usbcore keeps at most this many endpoints per alt setting (USB_MAXENDPOINTS).
_MAX_ENDPOINTS = 30


def _duplicate(
    accepted: list[tuple[int, int, Endpoint]], inum: int, asnum: int, e: Endpoint
) -> bool:
    """config.c `config_endpoint_is_duplicate`: the same address (or, for a control
    endpoint, the same number) already taken in this alt setting or another interface."""
    control = e.transfer_type is TransferType.CONTROL
    for i, a, other in accepted:
        if i == inum and a != asnum:
            continue
        if other.address == e.address:
            return True
        if (control or other.transfer_type is TransferType.CONTROL) and other.number == e.number:
            return True
    return False


def parse_configuration(data: bytes) -> Configuration | None:
    """A whole configuration descriptor set, read with usbcore's rules.

    None when `data` is not a complete set (the kernel first reads only the 9-byte
    header to learn wTotalLength). Endpoints usbcore skips are skipped here too: a short
    descriptor, number 0 or above 15 (reserved bits set), more than bNumEndpoints (at
    most 30), a duplicate address. What usbcore would read in a way this parser does not
    model makes the configuration `irregular`.
    """
    if len(data) < 9 or data[1] != DESC_CONFIGURATION or data[0] < 9:
        return None
    total = int.from_bytes(data[2:4], "little")
    if total > len(data) or total < data[0]:
        return None
    value, num_interfaces = data[5], data[4]
    alts: list[AltSetting] = []
    accepted: list[tuple[int, int, Endpoint]] = []
    irregular: str | None = None
    seen: set[tuple[int, int]] = set()
    current: tuple[int, int, int, int, int] | None = None
    room = 0
    endpoints: list[Endpoint] = []
    pos = data[0]
    while pos + 2 <= total:
        length, kind = data[pos], data[pos + 1]
        if length < 2 or pos + length > total:
            irregular = irregular or f"a descriptor of length {length} at offset {pos}"
            break
        if kind == DESC_INTERFACE:
            if current is not None:
                alts.append(AltSetting(*current, endpoints=tuple(endpoints)))
            current, endpoints = None, []
            if length < 9:
                irregular = irregular or f"an interface descriptor of length {length}"
            else:
                inum, asnum = data[pos + 2], data[pos + 3]
                if inum >= num_interfaces or (inum, asnum) in seen:
                    irregular = (
                        irregular or f"interface {inum} alt setting {asnum} is invalid or repeated"
                    )
                seen.add((inum, asnum))
                current = (inum, asnum, data[pos + 5], data[pos + 6], data[pos + 7])
                room = min(data[pos + 4], _MAX_ENDPOINTS)
        elif kind == DESC_ENDPOINT and current is not None and length >= 7:
            endpoint = Endpoint(
                address=data[pos + 2],
                attributes=data[pos + 3],
                max_packet_size=int.from_bytes(data[pos + 4 : pos + 6], "little"),
                interval=data[pos + 6],
            )
            # config.c skips number 0 and anything above 15 (reserved bits set) first.
            usable = 0 < endpoint.address & 0x7F < 16 and len(endpoints) < room
            if usable and not _duplicate(accepted, current[0], current[1], endpoint):
                endpoints.append(endpoint)
                accepted.append((current[0], current[1], endpoint))
        pos += length
    if current is not None:
        alts.append(AltSetting(*current, endpoints=tuple(endpoints)))
    return Configuration(value, num_interfaces, tuple(alts), irregular)


def split_descriptors(raw: bytes) -> tuple[Configuration, ...] | None:
    """The configurations of a sysfs `descriptors` file (the 18-byte device descriptor,
    then each configuration's wTotalLength bytes, as usbcore read them); None if malformed."""
    if len(raw) < 18 or raw[0] != 18 or raw[1] != DESC_DEVICE:
        return None
    configs: list[Configuration] = []
    pos = 18
    while pos < len(raw):
        if len(raw) - pos < 9:
            return None
        total = int.from_bytes(raw[pos + 2 : pos + 4], "little")
        parsed = parse_configuration(raw[pos : pos + total]) if total >= 9 else None
        if parsed is None:
            return None
        configs.append(parsed)
        pos += total
    return tuple(configs)
