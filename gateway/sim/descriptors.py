"""USB descriptors of simulated devices, built from small typed records (USB 2.0 ch. 9)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..protocol import TransferType

DT_DEVICE = 0x01
DT_CONFIG = 0x02
DT_STRING = 0x03
DT_INTERFACE = 0x04
DT_ENDPOINT = 0x05
DT_DEVICE_QUALIFIER = 0x06
DT_OTHER_SPEED_CONFIG = 0x07
DT_BOS = 0x0F
DT_HID = 0x21
DT_REPORT = 0x22

LANGID_EN_US = 0x0409

_ENDPOINT = struct.Struct("<BBBBHB")
_INTERFACE = struct.Struct("<BBBBBBBBB")
_CONFIG = struct.Struct("<BBHBBBBB")
_DEVICE = struct.Struct("<BBHBBBBHHHBBBB")
_QUALIFIER = struct.Struct("<BBHBBBBBB")


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    """One endpoint. Sizes and intervals are for high speed; `fs_*` for full speed."""

    address: int  # bit 7: IN
    transfer_type: TransferType
    max_packet_size: int
    interval: int = 0
    fs_max_packet_size: int | None = None
    fs_interval: int | None = None

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)

    def packet_size(self, high_speed: bool) -> int:
        if high_speed or self.fs_max_packet_size is None:
            return self.max_packet_size
        return self.fs_max_packet_size

    def encode(self, high_speed: bool) -> bytes:
        interval = self.interval if high_speed or self.fs_interval is None else self.fs_interval
        return _ENDPOINT.pack(
            _ENDPOINT.size,
            DT_ENDPOINT,
            self.address,
            int(self.transfer_type),
            self.packet_size(high_speed),
            interval,
        )


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    """One alternate setting of one interface; `extra` (e.g. a HID descriptor) precedes
    the endpoints, as class descriptors do."""

    number: int
    alternate: int
    interface_class: int
    interface_subclass: int = 0
    interface_protocol: int = 0
    endpoints: tuple[EndpointDescriptor, ...] = ()
    extra: bytes = b""
    string_index: int = 0

    def encode(self, high_speed: bool) -> bytes:
        head = _INTERFACE.pack(
            _INTERFACE.size,
            DT_INTERFACE,
            self.number,
            self.alternate,
            len(self.endpoints),
            self.interface_class,
            self.interface_subclass,
            self.interface_protocol,
            self.string_index,
        )
        return head + self.extra + b"".join(e.encode(high_speed) for e in self.endpoints)


@dataclass(frozen=True, slots=True)
class ConfigurationDescriptor:
    """A configuration with every alternate setting of every interface."""

    value: int
    interfaces: tuple[InterfaceDescriptor, ...]
    attributes: int = 0xC0  # bit 7 must be set; 0x40 self-powered
    max_power: int = 0  # units of 2 mA
    string_index: int = 0

    def __post_init__(self) -> None:
        if not self.attributes & 0x80 or self.attributes & 0x1F:
            raise ValueError("bmAttributes needs bit 7 and no reserved bits")
        if not any(i.alternate == 0 for i in self.interfaces):
            raise ValueError("a configuration needs alternate setting 0 of its interfaces")

    @property
    def interface_numbers(self) -> tuple[int, ...]:
        return tuple(sorted({i.number for i in self.interfaces}))

    def alternate(self, number: int, alternate: int) -> InterfaceDescriptor | None:
        for interface in self.interfaces:
            if interface.number == number and interface.alternate == alternate:
                return interface
        return None

    def active_endpoints(self, alternates: Mapping[int, int]) -> dict[int, EndpointDescriptor]:
        """Endpoints by address for the given alternate setting of each interface."""
        return {
            ep.address: ep
            for i in self.interfaces
            if i.alternate == alternates.get(i.number, 0)
            for ep in i.endpoints
        }

    def encode(self, high_speed: bool, kind: int = DT_CONFIG) -> bytes:
        body = b"".join(i.encode(high_speed) for i in self.interfaces)
        head = _CONFIG.pack(
            _CONFIG.size,
            kind,
            _CONFIG.size + len(body),
            len(self.interface_numbers),
            self.value,
            self.string_index,
            self.attributes,
            self.max_power,
        )
        return head + body


def device_descriptor(
    *,
    usb_version: int,
    device_class: int,
    device_subclass: int,
    device_protocol: int,
    max_packet_size0: int,
    vendor_id: int,
    product_id: int,
    bcd_device: int,
    num_configurations: int,
) -> bytes:
    return _DEVICE.pack(
        _DEVICE.size,
        DT_DEVICE,
        usb_version,
        device_class,
        device_subclass,
        device_protocol,
        max_packet_size0,
        vendor_id,
        product_id,
        bcd_device,
        1,  # iManufacturer
        2,  # iProduct
        3,  # iSerialNumber
        num_configurations,
    )


def qualifier_descriptor(
    *,
    usb_version: int,
    device_class: int,
    device_subclass: int,
    device_protocol: int,
    max_packet_size0: int,
    num_configurations: int,
) -> bytes:
    """What the device would look like at its other speed (USB 2.0 9.6.2)."""
    return _QUALIFIER.pack(
        _QUALIFIER.size,
        DT_DEVICE_QUALIFIER,
        usb_version,
        device_class,
        device_subclass,
        device_protocol,
        max_packet_size0,
        num_configurations,
        0,
    )


def string_descriptor(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    if len(raw) > 253:
        raise ValueError(f"string {text!r} is too long for a descriptor")
    return bytes((2 + len(raw), DT_STRING)) + raw


def langid_table(*langids: int) -> bytes:
    """String descriptor 0: the languages the other strings come in."""
    return bytes((2 + 2 * len(langids), DT_STRING)) + b"".join(
        lang.to_bytes(2, "little") for lang in langids
    )
