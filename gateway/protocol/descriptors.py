"""USB descriptors, as far as a relay needs them.

RET_SUBMIT framing and metrics both need each endpoint's transfer type, which USB/IP
never states. It is learned by watching enumeration: the configuration descriptors a
GET_DESCRIPTOR returns, then SET_CONFIGURATION and SET_INTERFACE. Descriptors come
from the device side and are advisory: malformed ones are ignored, never fatal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import Direction, TransferType

# bmRequestType / bRequest of the standard requests that change what endpoints exist.
GET_DESCRIPTOR = 0x06
SET_CONFIGURATION = 0x09
SET_INTERFACE = 0x0B
DESC_DEVICE = 0x01
DESC_CONFIGURATION = 0x02
DESC_STRING = 0x03
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


@dataclass(frozen=True, slots=True)
class AltSetting:
    interface: int
    alternate: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    endpoints: tuple[Endpoint, ...]


def parse_configuration(data: bytes) -> tuple[int, tuple[AltSetting, ...]] | None:
    """(bConfigurationValue, alt settings) of a whole configuration descriptor set.

    None when `data` is not a complete, well-formed set (the kernel first reads only
    the 9-byte header to learn wTotalLength).
    """
    if len(data) < 9 or data[1] != DESC_CONFIGURATION or data[0] < 9:
        return None
    total = int.from_bytes(data[2:4], "little")
    if total > len(data):
        return None
    value = data[5]
    alts: list[AltSetting] = []
    current: tuple[int, int, int, int, int] | None = None
    endpoints: list[Endpoint] = []
    pos = data[0]
    while pos + 2 <= total:
        length, kind = data[pos], data[pos + 1]
        if length < 2 or pos + length > total:
            return None
        if kind == DESC_INTERFACE and length >= 9:
            if current is not None:
                alts.append(AltSetting(*current, endpoints=tuple(endpoints)))
            current = (data[pos + 2], data[pos + 3], data[pos + 5], data[pos + 6], data[pos + 7])
            endpoints = []
        elif kind == DESC_ENDPOINT and length >= 7 and current is not None:
            endpoints.append(
                Endpoint(
                    address=data[pos + 2],
                    attributes=data[pos + 3],
                    max_packet_size=int.from_bytes(data[pos + 4 : pos + 6], "little"),
                    interval=data[pos + 6],
                )
            )
        pos += length
    if current is not None:
        alts.append(AltSetting(*current, endpoints=tuple(endpoints)))
    return value, tuple(alts)


class EndpointMap:
    """Transfer type of each endpoint of the active configuration and alt settings."""

    def __init__(self, configuration_value: int = 0) -> None:
        self._configs: dict[int, tuple[AltSetting, ...]] = {}
        self._active = configuration_value
        self._alts: dict[int, int] = {}
        self._types: dict[int, TransferType] = {}

    @property
    def active_configuration(self) -> int:
        return self._active

    def interfaces(self) -> tuple[AltSetting, ...]:
        """The active alt setting of each interface of the active configuration."""
        alts = self._configs.get(self._active, ())
        return tuple(a for a in alts if a.alternate == self._alts.get(a.interface, 0))

    def transfer_type(self, ep: int, direction: Direction) -> TransferType:
        if ep == 0:
            return TransferType.CONTROL
        address = ep | (0x80 if direction == Direction.IN else 0)
        return self._types.get(address, TransferType.UNKNOWN)

    def learn_configuration(self, data: bytes) -> None:
        parsed = parse_configuration(data)
        if parsed is not None:
            self._configs[parsed[0]] = parsed[1]
            self._rebuild()

    def set_configuration(self, value: int) -> None:
        self._active = value
        self._alts.clear()
        self._rebuild()

    def set_interface(self, interface: int, alternate: int) -> None:
        self._alts[interface] = alternate
        self._rebuild()

    def control_completed(self, setup: Setup, data: bytes) -> None:
        """Update from a control URB that completed with status 0."""
        if setup.kind != 0:
            return
        wants_config = setup.value >> 8 == DESC_CONFIGURATION
        if setup.request == GET_DESCRIPTOR and setup.is_in and wants_config:
            self.learn_configuration(data)
        elif setup.request == SET_CONFIGURATION and setup.request_type == 0x00:
            self.set_configuration(setup.value & 0xFF)
        elif setup.request == SET_INTERFACE and setup.request_type == 0x01:
            self.set_interface(setup.index & 0xFF, setup.value & 0xFF)

    def _rebuild(self) -> None:
        self._types = {
            ep.address: ep.transfer_type for alt in self.interfaces() for ep in alt.endpoints
        }
