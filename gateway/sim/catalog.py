"""The devices `usbip-gateway sim` offers, by name, each on a fixed bus id."""

from __future__ import annotations

from collections.abc import Iterable

from .device import SimDevice
from .gadget_zero import Loopback, Pattern, SourceSink
from .hid import HidKeyboard

# name -> (bus id, devnum); fixed so a subset keeps the same bus ids.
DEVICE_SLOTS = {
    "sourcesink": ("1-1", 2),
    "loopback": ("1-2", 3),
    "keyboard": ("1-3", 4),
}
DEVICE_NAMES = tuple(DEVICE_SLOTS)


def make_devices(
    names: Iterable[str] = DEVICE_NAMES, *, pattern: Pattern | int = Pattern.ZEROS
) -> list[SimDevice]:
    devices: list[SimDevice] = []
    for name in dict.fromkeys(names):
        if name not in DEVICE_SLOTS:
            raise ValueError(f"unknown simulated device {name!r}")
        busid, devnum = DEVICE_SLOTS[name]
        if name == "sourcesink":
            devices.append(SourceSink(busid=busid, devnum=devnum, pattern=pattern))
        elif name == "loopback":
            devices.append(Loopback(busid=busid, devnum=devnum))
        else:
            devices.append(HidKeyboard(busid=busid, devnum=devnum))
    return devices
