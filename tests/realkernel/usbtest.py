"""usbtest/testusb scenario pieces: guest script fragments and result parsing."""

from __future__ import annotations

from collections.abc import Callable

from .guest import GuestResult

# All of usbtest's cases in Linux 6.1 (0..29). Which apply depends on the device: testusb
# prints nothing for a case the driver answers with EOPNOTSUPP ("unsupported" here).
# Unlink cases run last: case 11 has crashed usbip-host (GPF in stub_rx_loop) in Debian's
# 6.1 kernel, and with oops=panic the guest then stops at once.
UNLINK_CASES = (11, 12, 24)
ALL_CASES = tuple(c for c in range(30) if c not in UNLINK_CASES) + UNLINK_CASES

# Cases usbtest runs on Gadget Zero's bulk + control endpoints (no ISO, no interrupt):
# 0 nop, 1-4 bulk out/in (fixed, varying), 5-8 scatter-gather, 9 chapter 9 control,
# 10 queued control, 13 halt set/clear, 14 vendor control out/in, 17/18 odd-address bulk,
# 21 odd-address control, 29 toggle clearing. (Unlink cases 11, 12, 24: UNLINK_CASES.)
# 19/20 premapped odd-address bulk. 27/28 (bulk throughput) need pattern 0 and are
# "unsupported" with the pattern used here.
BULK_CONTROL_CASES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 17, 18, 19, 20, 21, 29)
# Isochronous: 15/16 iso out/in, 22/23 odd-address iso. A SourceSink gadget on dummy_hcd
# has none (dummy_hcd cannot do ISO, so f_sourcesink drops its ISO alternate setting).
ISO_CASES = (15, 16, 22, 23)
# Interrupt: 25/26 (6.1's f_sourcesink has no interrupt endpoints).
INTERRUPT_CASES = (25, 26)

# Gadget Zero with pattern 1 (byte i of each packet is i % 63) on both ends.
PATTERN = 1


def script_gadget_side(prefix: str = "gadget") -> str:
    """Make a SourceSink gadget on dummy_hcd and export it; sets $gadget_busid."""
    return f"""
modprobe usbtest pattern={PATTERN} || rk_fail "modprobe usbtest"
rk_sourcesink_gadget {PATTERN} || exit 1
gadget_busid=$(rk_local_busid 0525 a4a0) || exit 1
rk_result {prefix}_busid "$gadget_busid"
rk_wait 20 rk_has_driver "/sys/bus/usb/devices/$gadget_busid/$gadget_busid:1.0" \\
    || rk_fail "usbtest did not bind the local gadget"
rk_result {prefix}_local_drivers "$(rk_interface_drivers /sys/bus/usb/devices/$gadget_busid)"
rk_bind "$gadget_busid" || exit 1
"""


def script_iso_phase(prefix: str) -> str:
    """Reload usbtest with alt=1 (Gadget Zero's ISO alternate setting: usbtest otherwise
    picks alt 0, bulk only, and answers the ISO cases EOPNOTSUPP), run ISO_CASES on the
    attached 0525:a4a0 ($dev)."""
    case_list = " ".join(str(c) for c in ISO_CASES)
    return f"""
rmmod usbtest
modprobe usbtest pattern={PATTERN} alt=1 || rk_fail "modprobe usbtest alt=1"
rk_wait 20 test -e "$(realpath "$dev")/$(basename "$dev"):1.0/driver" \\
    || rk_fail "usbtest did not rebind with alt=1"
rk_result {prefix}_altsetting "$(cat "$(realpath "$dev")/$(basename "$dev"):1.0/bAlternateSetting")"
rk_mark {prefix}_start
rk_usbtest {prefix} "$dev" {case_list}
rk_mark {prefix}_end
"""


def script_attach_and_test(
    port: str,
    busid: str,
    prefix: str,
    cases: tuple[int, ...] = ALL_CASES,
    before_detach: str = "",
) -> str:
    """Attach BUSID through PORT (shell expressions), wait for usbtest, run the cases."""
    case_list = " ".join(str(c) for c in cases)
    return f"""
modprobe usbtest pattern={PATTERN} || rk_fail "modprobe usbtest"
rk_attach "{port}" "{busid}" || exit 1
dev=$(rk_vhci_device 0525 a4a0) || exit 1
rk_wait 20 test -e "$(realpath "$dev")/$(basename "$dev"):1.0/driver" \\
    || rk_fail "no driver bound on the vhci side"
rk_mark {prefix}_attached
rk_result {prefix}_speed "$(cat "$dev/speed")"
rk_usbtest {prefix} "$dev" {case_list}
rk_mark {prefix}_tested
{before_detach}
if test -e "$dev/devnum"; then rk_detach "$dev"; fi
"""


def case_results(res: GuestResult, prefix: str) -> dict[int, str]:
    """Case number -> "pass SECS" | "fail ERRNO (MSG)" | "unsupported" | "timeout" |
    "kernel-crash: RIP" (the guest kernel died during that case) | "running" (cut off)."""
    out: dict[int, str] = {}
    head = f"{prefix}_case_"
    for key, value in res.results.items():
        if key.startswith(head):
            out[int(key[len(head) :])] = value
    rips = [
        ln.split("RIP: ", 1)[1].strip().split(":", 1)[-1]
        for ln in res.kernel_problems()
        if "RIP: " in ln
    ]
    stalled = res.timed_out and _stub_stalled(res)
    for case, value in out.items():
        if value == "running" and res.exit_code is None and rips:
            out[case] = f"kernel-crash: {rips[0]}"
        elif value == "running" and stalled:
            out[case] = "kernel-hang: usbip-host stalled (recv a header, 0; tasks blocked)"
    return dict(sorted(out.items()))


def _stub_stalled(res: GuestResult) -> bool:
    """The same stub_rx bug, when it hangs instead of crashing: usbip-host's receive
    thread gives up on its socket and the tasks waiting on it block for minutes."""
    try:
        text = res.console_log.read_text(errors="replace")
    except FileNotFoundError:
        return False
    return "usbip-host" in text and "recv a header, 0" in text and "blocked for more than" in text


def known_stub_crash(res: GuestResult, cases: dict[int, str]) -> int | None:
    """The unlink case during which the guest's usbip-host crashed, if that is what
    ended the guest (the use-after-free in stub_rx_loop seen with Debian's 6.1)."""
    for case, value in cases.items():
        if case in UNLINK_CASES and value.startswith(
            ("kernel-crash: stub_rx_loop", "kernel-hang: usbip-host")
        ):
            return case
    return None


def check_cases(res: GuestResult, cases: dict[int, str], required: tuple[int, ...]) -> None:
    """Every `required` case passed; unlink cases passed or hit the known stub crash;
    the guest otherwise finished cleanly."""
    crash_case = known_stub_crash(res, cases)
    if crash_case is None:
        res.check()
    else:
        # Cases after the crash never ran; everything up to it must have passed.
        required = tuple(c for c in required if ALL_CASES.index(c) < ALL_CASES.index(crash_case))
    bad = {c: cases.get(c, "missing") for c in required if not cases.get(c, "").startswith("pass")}
    assert not bad, f"usbtest cases failed: {bad}\n{summary(cases)}\n{res.diagnosis()}"
    for c in UNLINK_CASES:
        v = cases.get(c, "missing")
        ok = (
            v.startswith("pass")
            or c == crash_case
            or (crash_case is not None and ALL_CASES.index(c) > ALL_CASES.index(crash_case))
        )
        assert ok, f"unlink case {c}: {v}\n{summary(cases)}\n{res.diagnosis()}"


def summary(cases: dict[int, str]) -> str:
    return "\n".join(f"  case {c:2d}: {v}" for c, v in cases.items())


def record_cases(timings: Callable[[str, str], None], label: str, cases: dict[int, str]) -> None:
    """Which cases passed and why the others did not, in the measurements table."""
    timings(
        f"usbtest {label}: passed",
        " ".join(str(c) for c, v in cases.items() if v.startswith("pass")),
    )
    timings(
        f"usbtest {label}: not passed",
        "; ".join(f"{c}={v}" for c, v in cases.items() if not v.startswith("pass")),
    )
