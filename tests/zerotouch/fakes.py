"""Fake sysfs trees and a fake `usbip` command for the zero-touch tests."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

USB_DEVICES = Path("bus/usb/devices")


@dataclass(frozen=True)
class FakeUsb:
    """A device to plug into a fake sysfs tree."""

    busid: str
    vid: int = 0x0781
    pid: int = 0x5583
    device_class: int = 0
    interfaces: tuple[tuple[int, int, int], ...] = ((0x08, 0x06, 0x50),)
    product: str | None = "Stick"
    serial: str | None = None
    driver: str = "usb"


class FakeSysfs:
    """`ROOT/bus/usb/devices/BUSID/...` and `ROOT/bus/usb/drivers/...`, as the kernel lays
    them out (devices are plain directories here, symlinks in the real tree)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices = root / USB_DEVICES
        self.devices.mkdir(parents=True, exist_ok=True)
        for driver in ("usb", "usbip-host", "usb-storage", "usbhid", "hub"):
            self.driver_dir(driver).mkdir(parents=True, exist_ok=True)
        (self.driver_dir("usbip-host") / "match_busid").write_text("")
        # The root hub is a device too (named usbN, which is not a bus id).
        (self.devices / "usb1").mkdir(exist_ok=True)
        (self.devices / "usb1" / "bDeviceClass").write_text("09\n")

    def driver_dir(self, name: str) -> Path:
        return self.root / "bus" / "usb" / "drivers" / name

    def plug(self, dev: FakeUsb) -> None:
        d = self.devices / dev.busid
        d.mkdir()
        for name, value in (
            ("idProduct", f"{dev.pid:04x}"),
            ("bDeviceClass", f"{dev.device_class:02x}"),
            ("bDeviceSubClass", "00"),
            ("bDeviceProtocol", "00"),
            ("bcdDevice", "0100"),
            ("bNumInterfaces", f"{len(dev.interfaces):2d}"),
        ):
            (d / name).write_text(value + "\n")
        for name, text in (("product", dev.product), ("serial", dev.serial)):
            if text is not None:
                (d / name).write_text(text + "\n")
        for n, (c, s, p) in enumerate(dev.interfaces):
            i = d / f"{dev.busid}:1.{n}"
            i.mkdir()
            (i / "bInterfaceClass").write_text(f"{c:02x}\n")
            (i / "bInterfaceSubClass").write_text(f"{s:02x}\n")
            (i / "bInterfaceProtocol").write_text(f"{p:02x}\n")
        self.set_driver(dev.busid, dev.driver)
        # idVendor last: the exporter skips a device until it is whole.
        (d / "idVendor").write_text(f"{dev.vid:04x}\n")

    def unplug(self, busid: str) -> None:
        d = self.devices / busid
        for path in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                path.rmdir()
        d.rmdir()

    def set_driver(self, busid: str, driver: str | None) -> None:
        link = self.devices / busid / "driver"
        link.unlink(missing_ok=True)
        if driver is not None:
            link.symlink_to(self.driver_dir(driver))

    def driver(self, busid: str) -> str | None:
        link = self.devices / busid / "driver"
        return Path(os.readlink(link)).name if link.is_symlink() else None


FAKE_USBIP = r'''#!PYTHON
"""A fake usbip: records its argv, and binds/unbinds in the fake sysfs tree."""
import json, os, sys
from pathlib import Path
ROOT = Path(ROOT_PATH)
with open(LOG_PATH, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args and args[0] == "--tcp-port":
    args = args[2:]
if len(args) >= 3 and args[0] in ("bind", "unbind") and args[1] == "-b":
    dev = ROOT / "bus/usb/devices" / args[2]
    if not dev.is_dir():
        print(f"usbip: error: device on busid {args[2]} not found", file=sys.stderr)
        sys.exit(1)
    link = dev / "driver"
    if link.is_symlink():
        link.unlink()
    drv = "usbip-host" if args[0] == "bind" else "usb"
    link.symlink_to(ROOT / "bus/usb/drivers" / drv)
    print(f"usbip: info: {args[0]} device on busid {args[2]}: complete")
    sys.exit(0)
sys.exit(int(os.environ.get("FAKE_USBIP_STATUS", "0")))
'''


def fake_usbip(directory: Path, sysfs_root: Path) -> tuple[Path, Path]:
    """Write the fake usbip script; (its path, the file of recorded argvs)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "usbip"
    calls = directory / "usbip-calls.jsonl"
    script.write_text(
        FAKE_USBIP.replace("PYTHON", sys.executable)
        .replace("ROOT_PATH", repr(str(sysfs_root)))
        .replace("LOG_PATH", repr(str(calls)))
    )
    script.chmod(0o755)
    calls.touch()
    return script, calls


def recorded(calls: Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()]
