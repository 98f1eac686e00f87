"""The device strings USB/IP records lack, read from sysfs on the exporting host.

Not part of the engine: this is the one place in the package that does I/O.
"""

from __future__ import annotations

from pathlib import Path

from gateway.protocol import check_busid

SYSFS_USB_DEVICES = Path("/sys/bus/usb/devices")


def read_device_strings(busid: str, root: Path = SYSFS_USB_DEVICES) -> dict[str, str | None]:
    """`serial`, `manufacturer` and `product` for `busid`; None for each unreadable one.

    Devices without a string descriptor have no such file; a bus id that could walk
    out of `root` is refused without touching the file system.
    """
    result: dict[str, str | None] = {"serial": None, "manufacturer": None, "product": None}
    if check_busid(busid) is not None:
        return result
    for name in result:
        try:
            raw = (root / busid / name).read_bytes()
        except OSError:
            continue
        # The kernel appends a newline; descriptors are UTF-16 it has converted to UTF-8.
        result[name] = raw.decode("utf-8", errors="replace").removesuffix("\n")
    return result
