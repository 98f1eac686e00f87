"""Device facts the USB/IP records do not carry: serial, manufacturer and product strings.

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

from gateway.protocol import check_busid

log = logging.getLogger("gateway.facts")

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
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_STRING + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    if len(raw) > _MAX_STRING:
        return None
    return raw.decode("utf-8", "replace").rstrip("\n") or None


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
