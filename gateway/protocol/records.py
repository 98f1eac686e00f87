"""The device and interface records of the op phase (usbip_network.h)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .constants import BUSID_SIZE, PATH_SIZE
from .errors import LocalProtocolError, RemoteProtocolError

_DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
_INTERFACE = struct.Struct(">BBBx")
DEVICE_RECORD_SIZE = _DEVICE.size  # 312
INTERFACE_RECORD_SIZE = _INTERFACE.size  # 4

# Linux bus ids are "<bus>-<port>[.<port>...]"; simulators and other servers use
# similar short tokens. Nothing that could walk a path or hide a second name.
_BUSID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:_-]{0,30}")


def check_busid(busid: str) -> str | None:
    """Return why `busid` is unacceptable, or None when it is fine."""
    if not _BUSID_RE.fullmatch(busid):
        return f"bus id {busid!r} is not of the form 1-2.3"
    if ".." in busid:
        return f"bus id {busid!r} contains '..'"
    return None


def decode_cstring(raw: bytes, field: str) -> str:
    """A NUL-terminated, NUL-padded fixed-size field; one without a NUL is refused."""
    end = raw.find(b"\0")
    if end < 0:
        raise RemoteProtocolError(f"{field} is not NUL-terminated")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{field} is not valid UTF-8") from exc


def encode_cstring(value: str, size: int, field: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) >= size or b"\0" in raw:
        raise LocalProtocolError(f"{field} {value!r} does not fit in {size - 1} bytes")
    return raw.ljust(size, b"\0")


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    interface_class: int
    interface_subclass: int
    interface_protocol: int

    def __post_init__(self) -> None:
        for name in ("interface_class", "interface_subclass", "interface_protocol"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise LocalProtocolError(f"{name} out of range")

    def encode(self) -> bytes:
        return _INTERFACE.pack(
            self.interface_class, self.interface_subclass, self.interface_protocol
        )

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> InterfaceInfo:
        return cls(*_INTERFACE.unpack_from(raw, offset))


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The 312-byte `usbip_usb_device` record of DEVLIST and IMPORT replies."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    id_vendor: int
    id_product: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int

    def __post_init__(self) -> None:
        for name, top in (
            ("busnum", 0xFFFF),  # devid packs busnum into 16 bits
            ("devnum", 0xFFFF),
            ("speed", 0xFFFFFFFF),
            ("id_vendor", 0xFFFF),
            ("id_product", 0xFFFF),
            ("bcd_device", 0xFFFF),
            ("device_class", 0xFF),
            ("device_subclass", 0xFF),
            ("device_protocol", 0xFF),
            ("configuration_value", 0xFF),
            ("num_configurations", 0xFF),
            ("num_interfaces", 0xFF),
        ):
            if not 0 <= getattr(self, name) <= top:
                raise LocalProtocolError(f"device record field {name} out of range")

    @property
    def devid(self) -> int:
        """The URB-phase device id: busnum << 16 | devnum."""
        return (self.busnum << 16) | self.devnum

    def encode(self) -> bytes:
        return _DEVICE.pack(
            encode_cstring(self.path, PATH_SIZE, "path"),
            encode_cstring(self.busid, BUSID_SIZE, "busid"),
            self.busnum,
            self.devnum,
            self.speed,
            self.id_vendor,
            self.id_product,
            self.bcd_device,
            self.device_class,
            self.device_subclass,
            self.device_protocol,
            self.configuration_value,
            self.num_configurations,
            self.num_interfaces,
        )

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> DeviceInfo:
        fields = _DEVICE.unpack_from(raw, offset)
        path = decode_cstring(fields[0], "device path")
        busid = decode_cstring(fields[1], "device busid")
        if reason := check_busid(busid):
            raise RemoteProtocolError(reason)
        try:
            return cls(path, busid, *fields[2:])
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class ExportedDevice:
    """One entry of a DEVLIST reply: the device and its interfaces."""

    info: DeviceInfo
    interfaces: tuple[InterfaceInfo, ...] = ()

    def __post_init__(self) -> None:
        if len(self.interfaces) != self.info.num_interfaces:
            raise LocalProtocolError(
                f"device {self.info.busid} declares {self.info.num_interfaces} interfaces "
                f"but {len(self.interfaces)} are listed"
            )

    def encode(self) -> bytes:
        return self.info.encode() + b"".join(i.encode() for i in self.interfaces)
