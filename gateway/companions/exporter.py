"""Zero-touch export on the server: bind USB devices to usbip-host as they appear.

Polls `SYSFS/bus/usb/devices` (a configurable root, so tests use a fake tree), and for
each device that is not hidden binds it to `usbip-host`, either by running
`usbip bind -b BUSID` (the default) or by doing what that command does through sysfs:
add the bus id to `usbip-host`'s `match_busid`, unbind the device from its driver and
bind it to `usbip-host`. Hubs are never exported; the hide list (rules in the policy
language, docs/policy.md) keeps the host's own keyboard or network adapter at home.

A device that leaves has its `match_busid` entry removed (otherwise whatever is plugged
into that port next would be grabbed by usbip-host before the hide list is consulted);
on shutdown every device this exporter bound is unbound (`usbip unbind -b BUSID`), which
gives it back to its own driver. Devices bound to usbip-host by someone else are left as
they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gateway.config import ExporterSettings
from gateway.edges.device_facts import read_attribute
from gateway.policy import ClientFacts, DeviceFacts, Policy

log = logging.getLogger("gateway.companions.exporter")

USBIP_HOST = "usbip-host"
HUB_CLASS = 0x09
_BUSID = re.compile(r"^[0-9]+-[0-9]+(\.[0-9]+)*$")
_MAX_ATTR = 512
COMMAND_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0

# argv -> (exit status, combined output)
Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]


async def run_command(argv: Sequence[str]) -> tuple[int, str]:
    """Run a command (bounded), its exit status and output; never raises for its failure."""
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            done = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False
            )
    except OSError as exc:
        return 127, str(exc)
    except trio.TooSlowError:
        return 124, f"no answer within {COMMAND_TIMEOUT:g}s"
    output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
    return done.returncode, output


def hide_policy(hide: Sequence[str], source: str = "exporter.hide") -> Policy:
    """The hide list as a policy: one `reject` rule per entry, then `default allow`.

    Each entry is a rule's attributes (`id 0bda:*`, `busid "1-1.4"`, `class 03`,
    `with-interface one-of { 03:01:01 03:01:02 }`); a `PolicyError` names the entry's
    line (its index + 1).
    """
    lines = [f"reject {entry}" for entry in hide]
    return Policy.parse("\n".join([*lines, "default allow"]) + "\n", source)


@dataclass(frozen=True, slots=True)
class UsbDevice:
    """One USB device as sysfs shows it."""

    facts: DeviceFacts
    driver: str | None  # the bound driver's name ("usb" for most), None if unbound

    @property
    def busid(self) -> str:
        return self.facts.busid

    @property
    def is_hub(self) -> bool:
        return self.facts.device_class == HUB_CLASS


class UsbSysfs:
    """Reads USB devices from `ROOT/bus/usb/devices`, writes usbip-host's control files."""

    def __init__(self, root: Path = Path("/sys")) -> None:
        self.root = root
        self.devices_dir = root / "bus" / "usb" / "devices"
        self.usbip_host = root / "bus" / "usb" / "drivers" / USBIP_HOST

    def scan(self) -> dict[str, UsbDevice]:
        found: dict[str, UsbDevice] = {}
        try:
            names = sorted(p.name for p in self.devices_dir.iterdir())
        except OSError as exc:
            log.warning("cannot read %s: %s", self.devices_dir, exc)
            return found
        for name in names:
            if _BUSID.match(name):
                device = self.read(name)
                if device is not None:
                    found[name] = device
        return found

    def read(self, busid: str) -> UsbDevice | None:
        directory = self.devices_dir / busid
        vendor = _hex(directory / "idVendor")
        product = _hex(directory / "idProduct")
        if vendor is None or product is None:
            return None  # half-made or gone: the next scan sees it whole
        interfaces: list[tuple[int, int, int]] = []
        try:
            children = sorted(p for p in directory.iterdir() if p.name.startswith(f"{busid}:"))
        except OSError:
            return None
        for child in children:
            triple = tuple(
                _hex(child / f"bInterface{n}") for n in ("Class", "SubClass", "Protocol")
            )
            if all(v is not None for v in triple):
                interfaces.append(triple)  # type: ignore[arg-type]
        facts = DeviceFacts(
            busid=busid,
            vendor_id=vendor,
            product_id=product,
            device_class=_hex(directory / "bDeviceClass"),
            interfaces=tuple(interfaces),
            serial=_text(directory / "serial"),
            manufacturer=_text(directory / "manufacturer"),
            product=_text(directory / "product"),
            device_subclass=_hex(directory / "bDeviceSubClass"),
            device_protocol=_hex(directory / "bDeviceProtocol"),
            bcd_device=_hex(directory / "bcdDevice"),
        )
        return UsbDevice(facts, _driver(directory))

    def match_busid(self, op: str, busid: str) -> None:
        """`add BUSID` / `del BUSID` on usbip-host's match list (OSError if refused)."""
        (self.usbip_host / "match_busid").write_text(f"{op} {busid}")


def _read(path: Path) -> str | None:
    raw = read_attribute(path, _MAX_ATTR)
    return None if raw is None else raw.decode("utf-8", "replace").strip() or None


def _hex(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _text(path: Path) -> str | None:
    return _read(path)


def _driver(directory: Path) -> str | None:
    link = directory / "driver"
    try:
        return Path(link.readlink()).name if link.is_symlink() else None
    except OSError:
        return None


class Exporter:
    """The polling loop and what it has bound."""

    def __init__(
        self,
        settings: ExporterSettings,
        *,
        runner: Runner = run_command,
    ) -> None:
        self.settings = settings
        self.sysfs = UsbSysfs(settings.sysfs)
        self.hide = hide_policy(settings.hide)
        self.runner = runner
        self.bound: set[str] = set()  # bound to usbip-host by this exporter
        self.present: dict[str, UsbDevice] = {}
        self.hidden: set[str] = set()
        self.failed: dict[str, str] = {}  # bus id -> why the last bind failed
        self.scans = 0
        self._scanned = trio.Event()

    # -- decisions

    def exportable(self, device: UsbDevice) -> tuple[bool, str]:
        if device.is_hub:
            return False, "a hub"
        decision = self.hide.decide(ClientFacts(), device.facts)
        if not decision.allowed:
            return False, f"hidden by {decision.reason}"
        return True, ""

    # -- the loop

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        log.info(
            "exporter: watching %s every %gs (%s, %d hide rules)",
            self.sysfs.devices_dir,
            self.settings.interval,
            self.settings.method,
            len(self.settings.hide),
        )
        task_status.started()
        try:
            while True:
                await self.scan_once()
                await trio.sleep(self.settings.interval)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                await self.release_all()

    async def wait_scan(self) -> int:
        """Wait for the next scan to finish; the scan count."""
        await self._scanned.wait()
        return self.scans

    async def scan_once(self) -> None:
        # In a thread: the kernel takes the USB device lock to show `product`, `serial`
        # and `manufacturer`, so a read waits while a device is being probed or reset.
        # On the event loop that wait would stall every session of the gateway.
        now = await trio.to_thread.run_sync(self.sysfs.scan, abandon_on_cancel=True)
        for busid in sorted(set(self.present) - set(now)):
            await self._gone(busid)
        for busid, device in sorted(now.items()):
            await self._seen(device, first=busid not in self.present)
        self.present = now
        self.scans += 1
        self._scanned.set()
        self._scanned = trio.Event()

    async def _seen(self, device: UsbDevice, *, first: bool) -> None:
        busid = device.busid
        ok, why = self.exportable(device)
        if not ok:
            if first or busid not in self.hidden:
                log.info("exporter: %s (%s) not exported: %s", busid, _describe(device), why)
            self.hidden.add(busid)
            return
        self.hidden.discard(busid)
        if device.driver == USBIP_HOST:
            if first and busid not in self.bound:
                log.info("exporter: %s already bound to usbip-host; left as it is", busid)
            return
        if busid in self.bound:
            log.warning(
                "exporter: %s left usbip-host (now %s); binding again", busid, device.driver
            )
        error = await self.bind(busid)
        if error is None:
            self.bound.add(busid)
            self.failed.pop(busid, None)
            log.info("exporter: exported %s (%s)", busid, _describe(device))
        elif self.failed.get(busid) != error:
            self.failed[busid] = error
            log.error("exporter: could not bind %s to usbip-host: %s", busid, error)

    async def _gone(self, busid: str) -> None:
        self.hidden.discard(busid)
        self.failed.pop(busid, None)
        if busid not in self.bound:
            return
        self.bound.discard(busid)
        # The kernel forgets the device, not the match entry: remove it, so the next
        # device on this port is judged by the hide list first.
        try:
            self.sysfs.match_busid("del", busid)
        except OSError as exc:
            log.debug("exporter: match_busid del %s: %s", busid, exc)
        log.info("exporter: %s removed", busid)

    # -- binding

    async def bind(self, busid: str) -> str | None:
        """Bind to usbip-host; None on success, else why not."""
        if self.settings.method == "command":
            status, output = await self.runner([*self.settings.usbip, "bind", "-b", busid])
            return None if status == 0 else f"exit status {status}: {output}"
        try:
            self.sysfs.match_busid("add", busid)
            device = self.sysfs.read(busid)
            if device is not None and device.driver is not None:
                driver = self.sysfs.root / "bus" / "usb" / "drivers" / device.driver
                (driver / "unbind").write_text(busid)
            (self.sysfs.usbip_host / "bind").write_text(busid)
        except OSError as exc:
            return str(exc)
        return None

    async def unbind(self, busid: str) -> str | None:
        """Give the device back to its own driver; None on success, else why not."""
        if self.settings.method == "command":
            status, output = await self.runner([*self.settings.usbip, "unbind", "-b", busid])
            return None if status == 0 else f"exit status {status}: {output}"
        try:
            (self.sysfs.usbip_host / "unbind").write_text(busid)
            self.sysfs.match_busid("del", busid)
            (self.sysfs.root / "bus" / "usb" / "drivers_probe").write_text(busid)
        except OSError as exc:
            return str(exc)
        return None

    async def release_all(self) -> None:
        for busid in sorted(self.bound):
            error = await self.unbind(busid)
            if error is None:
                log.info("exporter: unbound %s from usbip-host", busid)
            else:
                log.error("exporter: could not unbind %s: %s", busid, error)
            self.bound.discard(busid)

    def status(self) -> dict[str, Any]:
        return {
            "exported": sorted(self.bound),
            "hidden": sorted(self.hidden),
            "failed": dict(sorted(self.failed.items())),
            "scans": self.scans,
        }


def _describe(device: UsbDevice) -> str:
    facts = device.facts
    name = f" {facts.product!r}" if facts.product else ""
    return f"{facts.vendor_id:04x}:{facts.product_id:04x}{name}"
