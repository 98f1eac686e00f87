"""usbtest (the kernel's USB test driver, driven by testusb) against real devices over usbip.

The device under test is a real kernel gadget: configfs SourceSink (usb_f_ss_lb) on
dummy_hcd, Gadget Zero's 0525:a4a0, exported by the guest's usbipd."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Timings
from .guest import Guest
from .image import GuestImage
from .usbtest import (
    BULK_CONTROL_CASES,
    case_results,
    check_cases,
    record_cases,
    script_attach_and_test,
    script_gadget_side,
    summary,
)

pytestmark = pytest.mark.realkernel


def test_usbtest_gadget_direct(
    guest_image: GuestImage, testusb_binary: Path, tmp_path: Path, timings: Timings
) -> None:
    """Baseline without the gateway: what usbip itself passes on this gadget."""
    script = (
        "rk_start_usbipd\n"
        + script_gadget_side()
        + script_attach_and_test("$RK_HOSTFWD_PORT", "$gadget_busid", "direct")
    )
    guest = Guest(guest_image, tmp_path / "share", script=script, files={"testusb": testusb_binary})
    res = guest.run(timeout=300)
    cases = case_results(res, "direct")
    (tmp_path / "cases.txt").write_text(summary(cases))
    print(summary(cases))
    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    # The same record as the gateway run, so the two can be read side by side.
    record_cases(timings, "direct", cases)
    check_cases(res, cases, BULK_CONTROL_CASES)
    assert res["gadget_local_drivers"].endswith(":usbtest")
    assert res["direct_drivers"].endswith(":usbtest"), res.diagnosis()
    if "t_direct_tested" in res.results:
        timings("usbtest cases", res.elapsed("direct_attached", "direct_tested"))
