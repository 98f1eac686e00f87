"""Device facts the USB/IP records do not carry: serial, manufacturer and product strings,
and the endpoint layout usbip-host frames URBs by.

The DEVLIST/IMPORT records give ids, class and interfaces. The strings come from sysfs
(`/sys/bus/usb/devices/BUSID/serial` ...) when the gateway runs where the devices are
and can read it; the simulator can publish the same layout for its devices. A string
that cannot be read is unknown (None), and a policy rule that needs it does not match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.protocol import Configuration, check_busid, split_descriptors

log = logging.getLogger("gateway.edges.device_facts")

SYSFS_USB_DEVICES = Path("/sys/bus/usb/devices")
_MAX_STRING = 512  # USB string descriptors are at most 126 UTF-16 characters


@dataclass(frozen=True, slots=True)
class DeviceStrings:
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None


class StringSource(Protocol):
    def strings(self, busid: str) -> DeviceStrings: ...


class NoStrings:
    """For a gateway that cannot see the devices' sysfs (e.g. usbipd on another host)."""

    def strings(self, busid: str) -> DeviceStrings:
        return DeviceStrings()


class SysfsStrings:
    """Reads `ROOT/BUSID/{serial,manufacturer,product}` as sysfs lays them out."""

    def __init__(self, root: Path = SYSFS_USB_DEVICES) -> None:
        self.root = root

    def strings(self, busid: str) -> DeviceStrings:
        if check_busid(busid) is not None:  # never a path outside ROOT
            return DeviceStrings()
        directory = self.root / busid
        return DeviceStrings(
            serial=_read(directory / "serial"),
            manufacturer=_read(directory / "manufacturer"),
            product=_read(directory / "product"),
        )


def _read(path: Path) -> str | None:
    raw = read_attribute(path, _MAX_STRING)
    return None if raw is None else raw.decode("utf-8", "replace").rstrip("\n") or None


def publish_sysfs(root: Path, busid: str, strings: DeviceStrings) -> None:
    """Write `strings` in the sysfs layout (for simulated devices)."""
    directory = root / busid
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("serial", "manufacturer", "product"):
        value = getattr(strings, name)
        path = directory / name
        if value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(value + "\n")


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What usbcore on this host holds for one device: every configuration as it parsed
    it, the active one (0: unconfigured) and each active interface's alt setting."""

    configurations: tuple[Configuration, ...]
    active: int
    alternates: dict[int, int]


class SysfsLayout:
    """Reads a device's endpoint layout where usbip-host has it: `ROOT/BUSID/descriptors`
    (the raw descriptors usbcore read), `bConfigurationValue`, `busnum`/`devnum`, and
    `ROOT/BUSID:C.I/bAlternateSetting` of each interface of the active configuration."""

    def __init__(self, root: Path = SYSFS_USB_DEVICES) -> None:
        self.root = root

    def present(self, busid: str) -> bool:
        return check_busid(busid) is None and (self.root / busid / "descriptors").is_file()

    def read(self, busid: str, busnum: int, devnum: int) -> DeviceState | None:
        """The device's state, or None if it is not there or not the device expected."""
        if check_busid(busid) is not None:
            return None
        directory = self.root / busid
        raw = read_attribute(directory / "descriptors", _MAX_DESCRIPTORS)
        configurations = None if raw is None else split_descriptors(raw)
        if configurations is None:
            return None
        if (_read_int(directory / "busnum"), _read_int(directory / "devnum")) != (busnum, devnum):
            return None  # another device now has this bus id
        active = _read_int(directory / "bConfigurationValue") or 0
        return DeviceState(configurations, active, self.alternates(busid, active) or {})

    def alternates(self, busid: str, active: int) -> dict[int, int] | None:
        if check_busid(busid) is not None:
            return None
        alternates: dict[int, int] = {}
        for directory in self.root.glob(f"{busid}:{active}.*"):
            number = _read_int(directory / "bInterfaceNumber", base=16)
            alternate = _read_int(directory / "bAlternateSetting")
            if number is None or alternate is None:
                return None
            alternates[number] = alternate
        return alternates

    def current(self, busid: str) -> tuple[int, dict[int, int]] | None:
        """The active configuration and alt settings now (after a change the stub made)."""
        if check_busid(busid) is not None:
            return None
        active = _read_int(self.root / busid / "bConfigurationValue") or 0
        alternates = self.alternates(busid, active)
        return None if alternates is None else (active, alternates)


_MAX_DESCRIPTORS = 1024 * 1024  # far above any real device; bounds a hostile sysfs


def read_attribute(path: Path, limit: int) -> bytes | None:
    """A sysfs file's bytes; None when absent, unreadable or longer than `limit` (a
    hostile or broken sysfs must not make a gateway read without end)."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    return None if len(raw) > limit else raw


def _read_int(path: Path, base: int = 10) -> int | None:
    raw = read_attribute(path, 64)
    try:
        return None if raw is None else int(raw.decode("ascii").strip() or "0", base)
    except (UnicodeDecodeError, ValueError):
        return None
