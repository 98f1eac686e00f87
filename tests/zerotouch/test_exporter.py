"""The server-side exporter against a fake sysfs tree and a fake usbip command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.companions.exporter import Exporter, UsbSysfs
from gateway.config import ConfigError, ExporterSettings, server_config

from .fakes import FakeSysfs, FakeUsb, fake_usbip, recorded

KEYBOARD = FakeUsb("1-2", 0x046D, 0xC31C, interfaces=((0x03, 0x01, 0x01),), driver="usbhid")
NIC = FakeUsb("2-1", 0x0BDA, 0x8153, interfaces=((0xFF, 0xFF, 0x00),))
HUB = FakeUsb("1-3", 0x05E3, 0x0610, device_class=0x09, interfaces=((0x09, 0, 0),))
STICK = FakeUsb("1-1.4", serial="S1")
HIDE = ("with-interface one-of { 03:01:01 03:01:02 }", "id 0bda:*")


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


def test_scan_reads_devices_as_sysfs_shows_them(sysfs: FakeSysfs) -> None:
    sysfs.plug(STICK)
    sysfs.plug(KEYBOARD)
    found = UsbSysfs(sysfs.root).scan()
    assert sorted(found) == ["1-1.4", "1-2"]  # usb1 (a root hub) is not a bus id
    stick = found["1-1.4"]
    assert stick.facts.to_spec() == (
        'id 0781:5583 busid "1-1.4" class 00 with-interface { 08:06:50 } serial "S1" name "Stick"'
    )
    assert stick.driver == "usb"
    assert found["1-2"].driver == "usbhid"


async def test_command_binds_only_what_is_not_hidden_and_unbinds_on_release(
    sysfs: FakeSysfs, tmp_path: Path
) -> None:
    usbip, calls = fake_usbip(tmp_path / "bin", sysfs.root)
    for device in (STICK, KEYBOARD, NIC, HUB):
        sysfs.plug(device)
    exporter = Exporter(
        ExporterSettings(enabled=True, sysfs=sysfs.root, usbip=(str(usbip),), hide=HIDE)
    )
    await exporter.scan_once()
    assert recorded(calls) == [["bind", "-b", "1-1.4"]]
    assert sysfs.driver("1-1.4") == "usbip-host"
    assert exporter.status() == {
        "exported": ["1-1.4"],
        "hidden": ["1-2", "1-3", "2-1"],
        "failed": {},
        "scans": 1,
    }
    await exporter.scan_once()  # nothing new: nothing run
    assert len(recorded(calls)) == 1

    sysfs.plug(FakeUsb("1-5", 0x0525, 0xA4A0))
    await exporter.scan_once()
    assert recorded(calls)[-1] == ["bind", "-b", "1-5"]

    await exporter.release_all()
    assert recorded(calls)[-2:] == [["unbind", "-b", "1-1.4"], ["unbind", "-b", "1-5"]]
    assert sysfs.driver("1-1.4") == "usb"
    assert exporter.bound == set()


async def test_removed_device_leaves_no_match_entry(sysfs: FakeSysfs, tmp_path: Path) -> None:
    usbip, calls = fake_usbip(tmp_path / "bin", sysfs.root)
    sysfs.plug(STICK)
    exporter = Exporter(ExporterSettings(sysfs=sysfs.root, usbip=(str(usbip),)))
    await exporter.scan_once()
    sysfs.unplug(STICK.busid)
    await exporter.scan_once()
    match = sysfs.driver_dir("usbip-host") / "match_busid"
    assert match.read_text() == "del 1-1.4"  # what the kernel's match list is told
    assert exporter.bound == set()
    await exporter.release_all()
    assert recorded(calls) == [["bind", "-b", "1-1.4"]]  # nothing left to unbind


async def test_failed_bind_is_reported_and_retried(sysfs: FakeSysfs) -> None:
    answers = [(1, "usbip: error: could not bind"), (0, "")]
    seen: list[list[str]] = []

    async def runner(argv: Sequence[str]) -> tuple[int, str]:
        seen.append(list(argv))
        return answers.pop(0)

    sysfs.plug(STICK)
    exporter = Exporter(ExporterSettings(sysfs=sysfs.root), runner=runner)
    await exporter.scan_once()
    assert exporter.status()["failed"] == {"1-1.4": "exit status 1: usbip: error: could not bind"}
    await exporter.scan_once()
    assert exporter.status()["exported"] == ["1-1.4"]
    assert seen == [["usbip", "bind", "-b", "1-1.4"]] * 2


async def test_sysfs_method_does_what_usbip_bind_does(sysfs: FakeSysfs) -> None:
    sysfs.plug(STICK)
    exporter = Exporter(ExporterSettings(sysfs=sysfs.root, method="sysfs"))
    await exporter.scan_once()
    host = sysfs.driver_dir("usbip-host")
    assert (host / "match_busid").read_text() == "add 1-1.4"
    assert (sysfs.driver_dir("usb") / "unbind").read_text() == "1-1.4"
    assert (host / "bind").read_text() == "1-1.4"
    sysfs.set_driver(STICK.busid, "usbip-host")  # what the kernel would have done
    await exporter.release_all()
    assert (host / "unbind").read_text() == "1-1.4"
    assert (host / "match_busid").read_text() == "del 1-1.4"
    assert (sysfs.root / "bus/usb/drivers_probe").read_text() == "1-1.4"


async def test_device_already_on_usbip_host_is_left_alone(sysfs: FakeSysfs) -> None:
    sysfs.plug(FakeUsb("1-1", driver="usbip-host"))
    seen: list[Sequence[str]] = []

    async def runner(argv: Sequence[str]) -> tuple[int, str]:
        seen.append(argv)
        return 0, ""

    exporter = Exporter(ExporterSettings(sysfs=sysfs.root), runner=runner)
    await exporter.scan_once()
    await exporter.release_all()
    assert seen == []


async def test_loop_polls_and_unbinds_when_cancelled(
    sysfs: FakeSysfs, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[list[str]] = []

    async def runner(argv: Sequence[str]) -> tuple[int, str]:
        seen.append(list(argv))
        sysfs.set_driver(argv[-1], "usbip-host" if argv[1] == "bind" else "usb")
        return 0, ""

    exporter = Exporter(ExporterSettings(sysfs=sysfs.root, interval=0.5), runner=runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        await exporter.wait_scan()
        sysfs.plug(STICK)
        start = trio.current_time()
        while "1-1.4" not in exporter.bound:
            await exporter.wait_scan()
        assert trio.current_time() - start <= 0.5
        nursery.cancel_scope.cancel()
    assert seen == [["usbip", "bind", "-b", "1-1.4"], ["usbip", "unbind", "-b", "1-1.4"]]


def _server(tmp_path: Path, exporter: dict[str, object]) -> dict[str, object]:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    return {"tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}, "exporter": exporter}


def test_config_reads_the_exporter_section(tmp_path: Path) -> None:
    config = server_config(
        _server(
            tmp_path,
            {
                "enabled": True,
                "interval": 0.25,
                "sysfs": "fake-sys",
                "method": "sysfs",
                "usbip": ["sudo", "usbip"],
                "hide": ["id 0bda:8153", 'busid "1-*"'],
            },
        ),
        tmp_path,
    )
    assert config.exporter == ExporterSettings(
        True,
        0.25,
        tmp_path / "fake-sys",
        "sysfs",
        ("sudo", "usbip"),
        ("id 0bda:8153", 'busid "1-*"'),
    )
    assert server_config(_server(tmp_path, {}), tmp_path).exporter == ExporterSettings()


@pytest.mark.parametrize(
    ("exporter", "message"),
    [
        ({"hide": ["id 0bda"]}, "exporter.hide: entry 1: expected VID:PID"),
        ({"hide": ["class 03", "colour red"]}, "exporter.hide: entry 2: unknown attribute"),
        ({"method": "udev"}, "exporter.method: 'udev' is not one of command, sysfs"),
        ({"interval": 0}, "exporter.interval: must be greater than 0"),
        ({"usbip": []}, "exporter.usbip: must not be empty"),
        ({"hidden": []}, "exporter.hidden: unknown key"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, exporter: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        server_config(_server(tmp_path, exporter), tmp_path)
    assert str(info.value).startswith(message)
