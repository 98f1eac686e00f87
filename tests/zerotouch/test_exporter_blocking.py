"""A sysfs read that blocks (the kernel holds the USB device lock while the device is
probed) must not stall the gateway's event loop: found by the real-kernel zero-touch test,
where the exporter reading a vhci device's `product` stalled the server gateway's own
sessions, which that device's probe was waiting for."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import trio

from gateway.companions.exporter import Exporter
from gateway.config import ExporterSettings

from .fakes import FakeSysfs, FakeUsb


async def test_a_blocked_sysfs_read_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.plug(FakeUsb("1-1", driver="usbip-host"))
    product = sysfs.devices / "1-1" / "product"
    product.unlink()
    os.mkfifo(product)  # opening it for reading blocks until a writer comes

    def unblock() -> None:
        with product.open("w") as fifo:
            fifo.write("Stick\n")

    # Whatever happens, the read is released after 3 s (a stalled loop cannot do it).
    releaser = threading.Timer(3.0, unblock)
    releaser.start()

    async def no_usbip(argv: Sequence[str]) -> tuple[int, str]:
        raise AssertionError(f"unexpected usbip {argv}")  # 1-1 is bound already

    exporter = Exporter(ExporterSettings(enabled=True, sysfs=sysfs.root), runner=no_usbip)
    ticks = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporter.scan_once)
            with trio.fail_after(10):
                while exporter.scans == 0:
                    await trio.sleep(0.05)
                    ticks += 1
    finally:
        releaser.cancel()
        releaser.join()
    # The loop kept running while the scan waited (about 3 s: some 60 ticks, not 1).
    assert ticks > 20
    assert exporter.present["1-1"].facts.product == "Stick"
