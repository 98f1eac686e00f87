"""The device model: descriptors, standard control requests, endpoint halt state.

Subclasses add what makes a device itself: `handle_transfer` for non-control
endpoints and `handle_control` for class and vendor requests. Both are async, so a
URB may stay pending until something happens, and be cancelled by an unlink.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import (
    Configuration,
    DeviceInfo,
    Direction,
    ExportedDevice,
    InterfaceInfo,
    Setup,
    Speed,
    parse_configuration,
)
from .descriptors import (
    DT_CONFIG,
    DT_DEVICE,
    DT_DEVICE_QUALIFIER,
    DT_OTHER_SPEED_CONFIG,
    DT_STRING,
    LANGID_EN_US,
    ConfigurationDescriptor,
    EndpointDescriptor,
    device_descriptor,
    langid_table,
    qualifier_descriptor,
    string_descriptor,
)
from .urb import EREMOTEIO, STALL, URB_SHORT_NOT_OK, Urb, UrbResult

# Standard requests (USB 2.0 table 9-4)
GET_STATUS = 0x00
CLEAR_FEATURE = 0x01
SET_FEATURE = 0x03
SET_ADDRESS = 0x05
GET_DESCRIPTOR = 0x06
GET_CONFIGURATION = 0x08
SET_CONFIGURATION = 0x09
GET_INTERFACE = 0x0A
SET_INTERFACE = 0x0B

# Feature selectors
ENDPOINT_HALT = 0
DEVICE_REMOTE_WAKEUP = 1
PORT_RESET = 4  # a hub-port feature; usbip-host turns it into a device reset
PORT_RESET_TYPE = 0x23  # USB_RT_PORT: class request to "other" (a hub port)

RECIP_DEVICE, RECIP_INTERFACE, RECIP_ENDPOINT = 0, 1, 2

SIM_SYSFS_ROOT = "/sys/devices/platform/usbip-gateway-sim"

_STATUS = struct.Struct("<H")
OK = UrbResult()


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the policy engine may match a device on."""

    busid: str
    vendor_id: int
    product_id: int
    serial: str
    manufacturer: str
    product: str
    device_class: int
    interface_classes: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "busid": self.busid,
            "vid": f"{self.vendor_id:04x}",
            "pid": f"{self.product_id:04x}",
            "serial": self.serial,
            "manufacturer": self.manufacturer,
            "product": self.product,
            "class": self.device_class,
            "interface_classes": list(self.interface_classes),
        }


class SimDevice:
    """A simulated USB device behind a simulated usbip-host."""

    def __init__(
        self,
        *,
        busid: str,
        devnum: int,
        vendor_id: int,
        product_id: int,
        manufacturer: str,
        product: str,
        serial: str,
        configurations: Sequence[ConfigurationDescriptor],
        busnum: int = 1,
        speed: Speed = Speed.HIGH,
        bcd_device: int = 0x0100,
        device_class: int = 0,
        device_subclass: int = 0,
        device_protocol: int = 0,
        max_packet_size0: int = 64,
        extra_strings: Sequence[str] = (),
    ) -> None:
        if not configurations:
            raise ValueError("a device needs at least one configuration")
        if speed not in (Speed.LOW, Speed.FULL, Speed.HIGH):
            raise ValueError("simulated devices are low, full or high speed")
        self.busid = busid
        self.busnum = busnum
        self.devnum = devnum
        self.speed = speed
        self.vendor_id = vendor_id
        self.product_id = product_id
        self.bcd_device = bcd_device
        self.device_class = device_class
        self.device_subclass = device_subclass
        self.device_protocol = device_protocol
        self.manufacturer = manufacturer
        self.product = product
        self.serial = serial
        self.configurations = tuple(configurations)
        # bcdUSB 2.00: usbtest and usbcore then expect no BOS descriptor.
        self.usb_version = 0x0200
        self.max_packet_size0 = max_packet_size0
        self._device_descriptor = device_descriptor(
            usb_version=self.usb_version,
            device_class=device_class,
            device_subclass=device_subclass,
            device_protocol=device_protocol,
            max_packet_size0=max_packet_size0,
            vendor_id=vendor_id,
            product_id=product_id,
            bcd_device=bcd_device,
            num_configurations=len(self.configurations),
        )
        # Index 0 is the LANGID table; 1..3 are named in the device descriptor.
        self._strings = (
            langid_table(LANGID_EN_US),
            *(string_descriptor(s) for s in (manufacturer, product, serial, *extra_strings)),
        )
        self.configuration = 0
        self.alternates: dict[int, int] = {}
        self.halted: set[int] = set()
        self.remote_wakeup = False
        self._endpoints: dict[int, EndpointDescriptor] = {}
        self.sysfs_root: Path | None = None  # where `publish_layout` keeps its files
        self.reset()

    # ------------------------------------------------------------ identity

    @property
    def high_speed(self) -> bool:
        return self.speed == Speed.HIGH

    @property
    def active_configuration(self) -> ConfigurationDescriptor | None:
        for config in self.configurations:
            if config.value == self.configuration:
                return config
        return None

    def _listed_configuration(self) -> ConfigurationDescriptor:
        return self.active_configuration or self.configurations[0]

    def info(self) -> DeviceInfo:
        """The 312-byte record usbipd would read from sysfs."""
        config = self._listed_configuration()
        return DeviceInfo(
            path=f"{SIM_SYSFS_ROOT}/usb{self.busnum}/{self.busid}",
            busid=self.busid,
            busnum=self.busnum,
            devnum=self.devnum,
            speed=int(self.speed),
            id_vendor=self.vendor_id,
            id_product=self.product_id,
            bcd_device=self.bcd_device,
            device_class=self.device_class,
            device_subclass=self.device_subclass,
            device_protocol=self.device_protocol,
            configuration_value=self.configuration,
            num_configurations=len(self.configurations),
            num_interfaces=len(config.interface_numbers),
        )

    def interface_infos(self) -> tuple[InterfaceInfo, ...]:
        config = self._listed_configuration()
        return tuple(
            InterfaceInfo(i.interface_class, i.interface_subclass, i.interface_protocol)
            for i in config.interfaces
            if i.alternate == self.alternates.get(i.number, 0)
        )

    def exported(self) -> ExportedDevice:
        return ExportedDevice(self.info(), self.interface_infos())

    def facts(self) -> DeviceFacts:
        classes = sorted({i.interface_class for c in self.configurations for i in c.interfaces})
        return DeviceFacts(
            busid=self.busid,
            vendor_id=self.vendor_id,
            product_id=self.product_id,
            serial=self.serial,
            manufacturer=self.manufacturer,
            product=self.product,
            device_class=self.device_class,
            interface_classes=tuple(classes),
        )

    # ------------------------------------------------------------ state

    def reset(self) -> None:
        """Back to the state of a device freshly bound to usbip-host: configured with
        its first configuration, every interface at alternate 0, nothing halted.
        Subclasses extend this to drop buffered data."""
        self._set_configuration(self.configurations[0].value)
        self.remote_wakeup = False

    def _set_configuration(self, value: int) -> None:
        self.configuration = value
        self.alternates = {}
        self.halted.clear()
        self._rebuild_endpoints()
        self.publish_layout()

    def publish_layout(self, root: Path | None = None) -> None:
        """Write what sysfs shows of a device bound to usbip-host, as the kernel keeps it
        current: `descriptors`, `busnum`, `devnum`, `bConfigurationValue`, and each
        interface's `bInterfaceNumber` and `bAlternateSetting` (ROOT/BUSID:C.I/). Once
        given a root, every configuration or alt setting change rewrites it before the
        request is answered, as usbip-host's own change is visible before its reply."""
        if root is not None:
            self.sysfs_root = root
        if self.sysfs_root is None:
            return
        directory = self.sysfs_root / self.busid
        directory.mkdir(parents=True, exist_ok=True)
        configs = (self.configuration_descriptor(i) for i in range(len(self.configurations)))
        raw = self._device_descriptor + b"".join(c for c in configs if c is not None)
        (directory / "descriptors").write_bytes(raw)
        (directory / "busnum").write_text(f"{self.busnum}\n")
        (directory / "devnum").write_text(f"{self.devnum}\n")
        (directory / "bConfigurationValue").write_text(
            f"{self.configuration}\n" if self.configuration else "\n"
        )
        for stale in self.sysfs_root.glob(f"{self.busid}:*"):
            for file in stale.iterdir():
                file.unlink()
            stale.rmdir()
        config = self.active_configuration
        for number in () if config is None else config.interface_numbers:
            interface = self.sysfs_root / f"{self.busid}:{self.configuration}.{number}"
            interface.mkdir()
            (interface / "bInterfaceNumber").write_text(f"{number:02x}\n")
            (interface / "bAlternateSetting").write_text(f"{self.alternates.get(number, 0):2d}\n")

    def _rebuild_endpoints(self) -> None:
        config = self.active_configuration
        self._endpoints = {} if config is None else config.active_endpoints(self.alternates)

    def endpoint(self, address: int) -> EndpointDescriptor | None:
        """An endpoint of the active configuration and alternate settings."""
        return self._endpoints.get(address)

    def parsed_configurations(self) -> tuple[Configuration, ...]:
        """Every configuration as usbcore would parse it (for framing URBs)."""
        parsed = (parse_configuration(c.encode(self.high_speed)) for c in self.configurations)
        return tuple(c for c in parsed if c is not None)

    def layout_state(self) -> tuple[int, dict[int, int]]:
        """The active configuration and alt settings, as sysfs would show them."""
        return self.configuration, dict(self.alternates)

    def configuration_descriptor(self, index: int, kind: int = DT_CONFIG) -> bytes | None:
        if not 0 <= index < len(self.configurations):
            return None
        high = self.high_speed
        if kind == DT_OTHER_SPEED_CONFIG:
            high = not high
        return self.configurations[index].encode(high, kind)

    # ------------------------------------------------------------ URBs

    async def submit(self, urb: Urb) -> UrbResult:
        """Complete one URB; may wait (pending) and may be cancelled (unlinked)."""
        if urb.ep == 0:
            assert urb.setup is not None
            result = await self._control(urb.setup, urb.data)
            limit = min(urb.length, urb.setup.length)
        else:
            endpoint = self.endpoint(urb.address)
            if endpoint is None:
                return STALL
            if urb.address in self.halted:
                return STALL
            result = await self.handle_transfer(urb, endpoint)
            limit = urb.length
        if urb.direction == Direction.OUT or urb.is_iso:
            return result
        if len(result.data) > limit:
            # A device never sends more than asked for; control replies are cut to wLength.
            result = UrbResult(result.status, result.data[:limit])
        if (
            result.status == 0
            and urb.transfer_flags & URB_SHORT_NOT_OK
            and len(result.data) < urb.length
        ):
            result = UrbResult(-EREMOTEIO, result.data)
        return result

    async def handle_transfer(self, urb: Urb, endpoint: EndpointDescriptor) -> UrbResult:
        """A URB for a non-control endpoint of the active setting; not halted."""
        return STALL

    async def handle_control(self, setup: Setup, data: bytes) -> UrbResult | None:
        """A class or vendor request, or a standard one the model does not know.
        None stalls it."""
        return None

    def on_interface(self, number: int, alternate: int) -> None:
        """Called after SET_INTERFACE (and SET_CONFIGURATION, for alternate 0)."""

    def on_clear_halt(self, address: int) -> None:
        """Called after CLEAR_FEATURE(ENDPOINT_HALT) on an endpoint."""

    async def _control(self, setup: Setup, data: bytes) -> UrbResult:
        if (setup.request_type, setup.request, setup.value) == (
            PORT_RESET_TYPE,
            SET_FEATURE,
            PORT_RESET,
        ):
            # usbip-host runs a hub-port reset as usb_reset_device, which keeps the
            # configuration and clears everything else.
            value = self.configuration
            self.reset()
            self._set_configuration(value)
            return OK
        result = self._standard(setup, data) if setup.kind == 0 else None
        if result is None:
            result = await self.handle_control(setup, data)
        return STALL if result is None else result

    # ------------------------------------------------------------ chapter 9

    def _standard(self, setup: Setup, data: bytes) -> UrbResult | None:
        request, recipient = setup.request, setup.recipient
        if setup.is_in:
            if request == GET_DESCRIPTOR and recipient == RECIP_DEVICE:
                return self._get_descriptor(setup)
            if request == GET_STATUS:
                return self._get_status(recipient, setup.index)
            if request == GET_CONFIGURATION and recipient == RECIP_DEVICE:
                return UrbResult(data=bytes((self.configuration,)))
            if request == GET_INTERFACE and recipient == RECIP_INTERFACE:
                return self._get_interface(setup.index & 0xFF)
            return None
        if request in (CLEAR_FEATURE, SET_FEATURE):
            return self._feature(setup, set_it=request == SET_FEATURE)
        if request == SET_CONFIGURATION and recipient == RECIP_DEVICE:
            return self._set_configuration_request(setup.value & 0xFF)
        if request == SET_INTERFACE and recipient == RECIP_INTERFACE:
            return self._set_interface(setup.index & 0xFF, setup.value & 0xFF)
        if request == SET_ADDRESS and recipient == RECIP_DEVICE:
            return OK  # vhci-hcd answers this itself; harmless if it ever arrives
        return None

    def _get_descriptor(self, setup: Setup) -> UrbResult | None:
        kind, index = setup.value >> 8, setup.value & 0xFF
        if kind == DT_DEVICE:
            return UrbResult(data=self._device_descriptor)
        if kind == DT_CONFIG:
            config = self.configuration_descriptor(index)
            return None if config is None else UrbResult(data=config)
        if kind == DT_STRING:
            if index >= len(self._strings):
                return None
            return UrbResult(data=self._strings[index])
        if kind in (DT_DEVICE_QUALIFIER, DT_OTHER_SPEED_CONFIG) and self.high_speed:
            # Only a high-speed capable device has another speed to describe
            # (USB 2.0 9.6.2); full- and low-speed ones stall, as usbcore expects.
            if kind == DT_OTHER_SPEED_CONFIG:
                config = self.configuration_descriptor(index, DT_OTHER_SPEED_CONFIG)
                return None if config is None else UrbResult(data=config)
            return UrbResult(
                data=qualifier_descriptor(
                    usb_version=self.usb_version,
                    device_class=self.device_class,
                    device_subclass=self.device_subclass,
                    device_protocol=self.device_protocol,
                    max_packet_size0=self.max_packet_size0,
                    num_configurations=len(self.configurations),
                )
            )
        # Everything else stalls: DT_BOS (a bcdUSB 2.00 device has none), and interface
        # or endpoint descriptors, which cannot be fetched on their own (usbtest checks).
        return None

    def _has_interface(self, number: int) -> bool:
        config = self.active_configuration
        return config is not None and number in config.interface_numbers

    def _get_status(self, recipient: int, index: int) -> UrbResult | None:
        if recipient == RECIP_DEVICE:
            config = self._listed_configuration()
            bits = (1 if config.attributes & 0x40 else 0) | (2 if self.remote_wakeup else 0)
            return UrbResult(data=_STATUS.pack(bits))
        if recipient == RECIP_INTERFACE:
            return UrbResult(data=_STATUS.pack(0)) if self._has_interface(index & 0xFF) else None
        if recipient == RECIP_ENDPOINT:
            address = index & 0x8F
            if address & 0x0F == 0:
                return UrbResult(data=_STATUS.pack(0))
            if self.endpoint(address) is None:
                return None
            return UrbResult(data=_STATUS.pack(1 if address in self.halted else 0))
        return None

    def _get_interface(self, number: int) -> UrbResult | None:
        if not self._has_interface(number):
            return None
        return UrbResult(data=bytes((self.alternates.get(number, 0),)))

    def _feature(self, setup: Setup, set_it: bool) -> UrbResult | None:
        recipient, feature = setup.recipient, setup.value
        if recipient == RECIP_DEVICE and feature == DEVICE_REMOTE_WAKEUP:
            self.remote_wakeup = set_it
            return OK
        if recipient == RECIP_ENDPOINT and feature == ENDPOINT_HALT:
            address = setup.index & 0x8F
            if address & 0x0F == 0:
                # ep0 never stays halted; clearing is a no-op, setting stalls.
                return None if set_it else OK
            if self.endpoint(address) is None:
                return None
            if set_it:
                self.halted.add(address)
            else:
                self.halted.discard(address)
                self.on_clear_halt(address)
            return OK
        return None

    def _set_configuration_request(self, value: int) -> UrbResult | None:
        if value != 0 and all(c.value != value for c in self.configurations):
            return None
        self._set_configuration(value)
        config = self.active_configuration
        if config is not None:
            for number in config.interface_numbers:
                self.on_interface(number, 0)
        return OK

    def _set_interface(self, number: int, alternate: int) -> UrbResult | None:
        config = self.active_configuration
        if config is None or config.alternate(number, alternate) is None:
            return None
        self.alternates[number] = alternate
        self._rebuild_endpoints()
        self.publish_layout()
        # A new alternate setting starts its endpoints un-halted (USB 2.0 9.4.10).
        self.halted = {a for a in self.halted if a in self._endpoints}
        for interface in config.interfaces:
            if interface.number == number:
                self.halted.difference_update(ep.address for ep in interface.endpoints)
        self.on_interface(number, alternate)
        return OK
