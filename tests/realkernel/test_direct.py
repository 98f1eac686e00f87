"""Proves the harness without the gateway: the guest's own usbipd exports QEMU's emulated
devices and the guest's vhci attaches them through the host port forward
(guest -> 10.0.2.2:HOSTPORT -> host 127.0.0.1:HOSTPORT -> guest usbipd:3240)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Timings
from .guest import Guest, usb_kbd, usb_storage, usb_tablet
from .image import GuestImage
from .storage import StorageImage

pytestmark = pytest.mark.realkernel

DIRECT_SCRIPT = """
rk_start_usbipd
rk_mark usbipd_up
busid=$(rk_local_busid 46f4 0001) || exit 1
rk_result storage_busid "$busid"
rk_bind "$busid" || exit 1
rk_attach "$RK_HOSTFWD_PORT" "$busid" || exit 1
dev=$(rk_vhci_device 46f4 0001) || exit 1
rk_mark storage_attached
rk_result storage_vhci_dev "${dev##*/}"
rk_result storage_drivers "$(rk_interface_drivers "$dev")"
rk_storage_io st "$dev"
rk_hid_check hid "$RK_HOSTFWD_PORT"
rk_mark hid_done
usbip port > /host/usbip-port.txt 2>&1
rk_detach "$dev"
rk_mark detached
sync
"""


def test_direct_storage_and_hid(guest_image: GuestImage, tmp_path: Path, timings: Timings) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    stick = StorageImage.create(disk)
    guest = Guest(
        guest_image,
        tmp_path / "share",
        script=DIRECT_SCRIPT,
        devices=[usb_storage(stick.image), usb_kbd(), usb_tablet()],
        params=stick.params(),
        files={"pattern_a.bin": stick.pattern_a},
    )
    res = guest.run(timeout=240)
    res.check()

    # Storage: the vhci-side disk is a different device from the exported local one.
    assert res["storage_drivers"].endswith(":usb-storage"), res.diagnosis()
    assert res["st_block"].startswith("sd")
    assert int(res["st_size_bytes"]) == 64 << 20
    assert res["st_readback_sha256"] == stick.pattern_a_sha256, res.diagnosis()
    assert res["st_region_b_sha256"] == stick.region_b_sha256, res.diagnosis()
    # What the guest wrote through usbip reached QEMU's backing file.
    assert stick.image_region_a_sha256() == stick.pattern_a_sha256

    # HID: keyboard and tablet both enumerate on vhci with usbhid and input devices.
    assert res["hid_exported"] == "2"
    assert res["hid_vhci_count"] == "2", res.diagnosis()
    products = {res["hid_0_product"], res["hid_1_product"]}
    assert products == {"QEMU USB Keyboard", "QEMU USB Tablet"}, res.diagnosis()
    for i in (0, 1):
        assert ":usbhid" in res[f"hid_{i}_drivers"], res.diagnosis()
        assert res[f"hid_{i}_inputs"], res.diagnosis()

    timings("qemu wall (boot..poweroff)", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    timings("script start..storage attached", res.elapsed("script_start", "storage_attached"))
    timings(f"write {stick.a_mb} MiB", res.elapsed("st_write_start", "st_write_end"))
    timings(f"read {stick.a_mb} MiB", res.elapsed("st_write_end", "st_read_a_end"))
    timings("hid export+attach+enumerate", res.elapsed("st_read_b_end", "hid_done"))
