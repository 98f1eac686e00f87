"""What the engine knows about a device and a client: plain frozen values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .text import quote

if TYPE_CHECKING:
    from gateway.protocol import DeviceInfo, InterfaceInfo

Interface = tuple[int, int, int]


def _check_byte(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} is not a byte")


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """One exported device. None means the fact is not known; rules needing it do not match.

    `interfaces` is in the order the device reports them; an empty tuple (an IMPORT
    reply carries none) counts as missing too.
    """

    busid: str
    vendor_id: int
    product_id: int
    device_class: int | None = None
    interfaces: tuple[Interface, ...] = ()
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    device_subclass: int | None = None
    device_protocol: int | None = None
    bcd_device: int | None = None

    def __post_init__(self) -> None:
        for name in ("vendor_id", "product_id", "bcd_device"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} {value} is not a 16-bit value")
        for name in ("device_class", "device_subclass", "device_protocol"):
            _check_byte(name, getattr(self, name))
        for interface in self.interfaces:
            if len(interface) != 3:
                raise ValueError(f"interface {interface!r} is not (class, subclass, protocol)")
            for value in interface:
                _check_byte("interface field", value)

    @classmethod
    def from_record(
        cls,
        info: DeviceInfo,
        interfaces: tuple[InterfaceInfo, ...] = (),
        *,
        serial: str | None = None,
        manufacturer: str | None = None,
        product: str | None = None,
    ) -> DeviceFacts:
        """From a DEVLIST or IMPORT device record; the strings come from elsewhere (sysfs)."""
        return cls(
            busid=info.busid,
            vendor_id=info.id_vendor,
            product_id=info.id_product,
            device_class=info.device_class,
            interfaces=tuple(
                (i.interface_class, i.interface_subclass, i.interface_protocol) for i in interfaces
            ),
            serial=serial,
            manufacturer=manufacturer,
            product=product,
            device_subclass=info.device_subclass,
            device_protocol=info.device_protocol,
            bcd_device=info.bcd_device,
        )

    def to_spec(self) -> str:
        """The facts in the rule language's attribute syntax (what `--device` accepts)."""
        parts = [f"id {self.vendor_id:04x}:{self.product_id:04x}"]
        if self.busid:
            parts.append(f"busid {quote(self.busid)}")
        if self.device_class is not None:
            parts.append(f"class {self.device_class:02x}")
        if self.interfaces:
            listed = " ".join(f"{c:02x}:{s:02x}:{p:02x}" for c, s, p in self.interfaces)
            parts.append(f"with-interface {{ {listed} }}")
        for name, value in (
            ("serial", self.serial),
            ("name", self.product),
            ("manufacturer", self.manufacturer),
        ):
            if value is not None:
                parts.append(f"{name} {quote(value)}")
        return " ".join(parts)


class Identity(Protocol):
    """What `from_identity` reads; `gateway.transport.identity.PeerIdentity` has it."""

    @property
    def common_name(self) -> str | None: ...
    @property
    def uris(self) -> tuple[str, ...]: ...
    @property
    def dns_names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """The identity in a verified client certificate."""

    common_name: str | None = None
    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()

    @classmethod
    def from_identity(cls, identity: Identity) -> ClientFacts:
        return cls(
            common_name=identity.common_name,
            uris=tuple(identity.uris),
            dns_names=tuple(identity.dns_names),
        )

    def to_spec(self) -> str:
        parts: list[str] = []
        if self.common_name is not None:
            parts.append(f"client-cn {quote(self.common_name)}")
        for name, values in (("client-uri", self.uris), ("client-dns", self.dns_names)):
            if len(values) == 1:
                parts.append(f"{name} {quote(values[0])}")
            elif values:
                parts.append(f"{name} {{ {' '.join(quote(v) for v in values)} }}")
        return " ".join(parts) or "(no identity)"
