"""Real kernel usbip through the gateway pair.

    guest vhci --(10.0.2.2:CPORT)--> client gw --(mutual TLS)--> server gw
        --> 127.0.0.1:HOSTPORT (QEMU port forward) --> guest usbipd / usbip-host

or, for the simulator, server gw --> `gateway sim` on the host."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from .conftest import Timings
from .guest import Guest, GuestResult, usb_kbd, usb_storage, usb_tablet
from .hostprocs import (
    HostProcesses,
    check_gateway_cli,
    host_processes,
    issue_client_cert,
    make_demo_certs,
    start_client_gateway,
    start_gateway_pair,
    start_sim,
    usbip_list,
)
from .image import GuestImage
from .storage import StorageImage
from .usbtest import (
    BULK_CONTROL_CASES,
    ISO_CASES,
    PATTERN,
    UNLINK_CASES,
    case_results,
    check_cases,
    record_cases,
    script_attach_and_test,
    script_gadget_side,
    script_iso_phase,
    summary,
)

pytestmark = pytest.mark.realkernel


@pytest.fixture(scope="module")
def gateway_cli() -> None:
    problem = check_gateway_cli()
    if problem:
        pytest.fail(f"the gateway CLI is not usable: {problem}", pytrace=False)


def check_host_processes(procs: HostProcesses, res: GuestResult | None = None) -> None:
    """The gateways must still run and must not have logged tracebacks."""
    extra = "" if res is None else "\n" + res.diagnosis()
    exits = procs.unexpected_exits()
    assert not exits, "host processes died:\n" + "\n".join(exits) + extra
    tracebacks = {
        name: lines
        for name, lines in procs.problems().items()
        if any("Traceback" in ln for ln in lines)
    }
    assert not tracebacks, f"tracebacks in host process logs: {tracebacks}{extra}"


def report_problems(procs: HostProcesses, timings: Timings) -> None:
    for name, lines in procs.problems().items():
        timings(f"{name} log problems", f"{len(lines)}: {lines[:3]}")


GW_STORAGE_HID_SCRIPT = """
rk_start_usbipd
busid=$(rk_local_busid 46f4 0001) || exit 1
rk_bind "$busid" || exit 1
rk_result gw_list "$(usbip --tcp-port "$RK_CLIENT_PORT" list -r 10.0.2.2 2>&1 \
    | grep -c '(46f4:0001)')"
rk_mark list_done

# Policy: the second client identity sees the stick (blocked, so listed) but no HID
# device (rejected), and its attach fails cleanly: an error, no vhci device.
rk_result denied_list_stick "$(usbip --tcp-port "$RK_DENIED_PORT" list -r 10.0.2.2 2>&1 \
    | grep -c '(46f4:0001)')"
rk_result denied_list_hid "$(usbip --tcp-port "$RK_DENIED_PORT" list -r 10.0.2.2 2>&1 \
    | grep -c -e '(0627:0001)')"
before=$(rk_vhci_total)
if usbip --tcp-port "$RK_DENIED_PORT" attach -r 10.0.2.2 -b "$busid" \
        > /host/denied_attach.txt 2>&1; then
    rk_result denied_attach_rc 0
else
    rk_result denied_attach_rc $?
fi
rk_result denied_attach_msg "$(head -c 200 /host/denied_attach.txt | tr '\n' ' ')"
rk_result denied_vhci_delta "$(($(rk_vhci_total) - before))"
rk_result denied_status "$(cat /sys/bus/usb/devices/$busid/usbip_status)"
rk_mark denied_done

# (1) storage through the gateway: write pattern A, read it back, read region B
rk_attach "$RK_CLIENT_PORT" "$busid" || exit 1
dev=$(rk_vhci_device 46f4 0001) || exit 1
rk_mark storage_attached
rk_storage_io gw "$dev"

# (2a) two more devices at once (keyboard + tablet) while the stick stays attached
rk_hid_check hid "$RK_CLIENT_PORT"
rk_result vhci_total "$(rk_vhci_total)"
rk_mark hid_done

# (2b) detach the stick, wait until usbip-host offers it again, re-attach, re-read
rk_detach "$dev" || exit 1
rk_mark detached
rk_wait 30 grep -qx 1 "/sys/bus/usb/devices/$busid/usbip_status" \
    || rk_fail "usbip-host did not release $busid after detach (usbip_status \
$(cat /sys/bus/usb/devices/$busid/usbip_status))"
rk_mark released
rk_attach "$RK_CLIENT_PORT" "$busid" || exit 1
dev=$(rk_vhci_device 46f4 0001) || exit 1
rk_mark reattached
b=$(rk_wait_block "$dev") || exit 1
echo 3 > /proc/sys/vm/drop_caches
mb_a=$(($(stat -c %s /host/pattern_a.bin) / 1048576))
rk_result re_readback_sha256 \
    "$(dd if=/dev/$b bs=1M count=$mb_a 2> /dev/null | sha256sum | cut -d' ' -f1)"
rk_result re_region_b_sha256 "$(dd if=/dev/$b bs=1M skip=$RK_B_OFFSET_MB count=$RK_B_MB \
    2> /dev/null | sha256sum | cut -d' ' -f1)"
rk_mark reread
for d in $(rk_usb_devices 0627 0001 vhci) "$dev"; do rk_detach "$d"; done
rk_result vhci_total_end "$(rk_vhci_total)"
"""


# The demo client may use everything; the "intruder" identity (same CA) sees the stick
# but may not import it, and sees nothing else.
STORAGE_POLICY = """\
allow client-uri "spiffe://usbip-gateway.local/client/demo"
block id 46f4:0001 client-cn "intruder"
default reject
"""


async def test_gateway_storage_hid_reattach(
    gateway_cli: None, guest_image: GuestImage, tmp_path: Path, timings: Timings
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    stick = StorageImage.create(disk)
    guest = Guest(
        guest_image,
        tmp_path / "share",
        script=GW_STORAGE_HID_SCRIPT,
        devices=[usb_storage(stick.image), usb_kbd(), usb_tablet()],
        params=stick.params(),
        files={"pattern_a.bin": stick.pattern_a},
    )
    certs = await make_demo_certs(tmp_path / "certs")
    await issue_client_cert(certs, "intruder")
    policy = tmp_path / "policy.rules"
    policy.write_text(STORAGE_POLICY)
    async with host_processes(tmp_path / "logs") as procs:
        t0 = trio.current_time()
        pair = await start_gateway_pair(
            procs, certs, upstream_port=guest.hostfwd_port, server_extra=("--policy", str(policy))
        )
        denied_port = await start_client_gateway(
            procs, "gw-client-intruder", certs, "intruder", pair.server_port
        )
        timings("gateways ready", trio.current_time() - t0)
        guest.params["RK_CLIENT_PORT"] = pair.client_port
        guest.params["RK_DENIED_PORT"] = denied_port
        res = await guest.arun(timeout=300)
        report_problems(procs, timings)
        check_host_processes(procs, res)
    res.check()
    assert res["gw_list"] == "1", res.diagnosis()
    # Policy: blocked stick listed but not importable, HID devices invisible, and the
    # refused attach leaves the device free for the allowed client.
    assert res["denied_list_stick"] == "1", res.diagnosis()
    assert res["denied_list_hid"] == "0", res.diagnosis()
    assert res["denied_attach_rc"] != "0", res.diagnosis()
    assert "Request Failed" in res["denied_attach_msg"], res.diagnosis()
    assert res["denied_vhci_delta"] == "0", res.diagnosis()
    assert res["denied_status"] == "1", res.diagnosis()  # SDEV_ST_AVAILABLE
    # (1) storage
    assert res["gw_readback_sha256"] == stick.pattern_a_sha256, res.diagnosis()
    assert res["gw_region_b_sha256"] == stick.region_b_sha256, res.diagnosis()
    assert stick.image_region_a_sha256() == stick.pattern_a_sha256
    # (2a) three devices attached through the gateway at once, HID bound to usbhid
    assert res["hid_vhci_count"] == "2", res.diagnosis()
    assert res["vhci_total"] == "3", res.diagnosis()
    for i in (0, 1):
        assert ":usbhid" in res[f"hid_{i}_drivers"], res.diagnosis()
        assert res[f"hid_{i}_inputs"], res.diagnosis()
    # (2b) re-attach after detach sees the same data
    assert res["re_readback_sha256"] == stick.pattern_a_sha256, res.diagnosis()
    assert res["re_region_b_sha256"] == stick.region_b_sha256, res.diagnosis()
    assert res["vhci_total_end"] == "0", res.diagnosis()

    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    timings("policy: denied list + attach", res.elapsed("list_done", "denied_done"))
    timings("attach storage via gw", res.elapsed("denied_done", "storage_attached"))
    timings(f"write {stick.a_mb} MiB via gw", res.elapsed("gw_write_start", "gw_write_end"))
    timings(f"read {stick.a_mb} MiB via gw", res.elapsed("gw_write_end", "gw_read_a_end"))
    timings("2 HID attach+enumerate via gw", res.elapsed("gw_read_b_end", "hid_done"))
    timings("detach -> usbip-host released", res.elapsed("detached", "released"))
    timings("re-attach via gw", res.elapsed("released", "reattached"))


def busid_of(listing: str, vid_pid: str) -> list[str]:
    return re.findall(rf"^\s+(\S+): .*\({vid_pid}\)\s*$", listing, re.MULTILINE)


SIM_HID_SCRIPT = """
rk_attach "$RK_CLIENT_PORT" "$RK_SIM_KBD_BUSID" || exit 1
kbd=$(rk_vhci_device 1209 0001) || exit 1
rk_wait 15 rk_has_input "$kbd" || rk_fail "sim keyboard: no input device"
rk_result simkbd_drivers "$(rk_interface_drivers "$kbd")"
rk_result simkbd_inputs "$(rk_input_names "$kbd")"
rk_detach "$kbd"
rk_mark simkbd_done
"""


async def test_gateway_sim_usbtest(
    gateway_cli: None,
    guest_image: GuestImage,
    testusb_binary: Path,
    tmp_path: Path,
    timings: Timings,
) -> None:
    """(3) + (4b): the simulator's Gadget Zero through the gateway pair into the guest's
    vhci; usbtest binds and runs its cases; the sim keyboard enumerates with usbhid."""
    certs = await make_demo_certs(tmp_path / "certs")
    async with host_processes(tmp_path / "logs") as procs:
        t0 = trio.current_time()
        _, sim_port = await start_sim(procs, extra=("--pattern", str(PATTERN)))
        pair = await start_gateway_pair(procs, certs, upstream_port=sim_port)
        timings("sim + gateways ready", trio.current_time() - t0)
        direct = await usbip_list(sim_port)
        via_gw = await usbip_list(pair.client_port)
        gz = busid_of(via_gw, "0525:a4a0")
        kbd = busid_of(via_gw, "1209:0001")
        assert gz, f"no 0525:a4a0 in the listing through the gateway:\n{via_gw}\n{direct}"
        assert kbd, f"no sim keyboard in the listing through the gateway:\n{via_gw}"
        assert busid_of(direct, "0525:a4a0") == gz
        guest = Guest(
            guest_image,
            tmp_path / "share",
            script=SIM_HID_SCRIPT
            + script_attach_and_test(
                "$RK_CLIENT_PORT",
                "$RK_SIM_GZ_BUSID",
                "sim",
                before_detach=script_iso_phase("simiso"),
            ),
            params={
                "RK_CLIENT_PORT": pair.client_port,
                "RK_SIM_GZ_BUSID": gz[0],
                "RK_SIM_KBD_BUSID": kbd[0],
            },
            files={"testusb": testusb_binary},
        )
        res = await guest.arun(timeout=400)
        report_problems(procs, timings)
        check_host_processes(procs, res)
    cases = case_results(res, "sim")
    iso = case_results(res, "simiso")
    (tmp_path / "cases.txt").write_text(summary(cases) + "\nalt=1:\n" + summary(iso))
    print(summary(cases))
    print("ISO (usbtest alt=1):\n" + summary(iso))
    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    record_cases(timings, "sim", cases)
    res.check()
    assert ":usbhid" in res["simkbd_drivers"], res.diagnosis()
    assert res["simkbd_inputs"], res.diagnosis()
    assert res["sim_drivers"].endswith(":usbtest"), res.diagnosis()
    timings("usbtest sim ISO (alt=1)", "; ".join(f"{c}={v}" for c, v in iso.items()))
    check_cases(res, cases, BULK_CONTROL_CASES + UNLINK_CASES)
    bad_iso = {c: iso.get(c, "missing") for c in ISO_CASES if not iso.get(c, "").startswith("pass")}
    assert not bad_iso, f"ISO cases through the gateway: {bad_iso}\n{res.diagnosis()}"
    timings("usbtest cases via gw", res.elapsed("sim_attached", "sim_tested"))


async def test_gateway_gadget_usbtest(
    gateway_cli: None,
    guest_image: GuestImage,
    testusb_binary: Path,
    tmp_path: Path,
    timings: Timings,
) -> None:
    """(4a): a real SourceSink gadget (dummy_hcd + configfs) exported by the guest's
    usbipd, attached through the gateway pair, driven by usbtest."""
    guest = Guest(
        guest_image,
        tmp_path / "share",
        script="rk_start_usbipd\n"
        + script_gadget_side()
        + script_attach_and_test("$RK_CLIENT_PORT", "$gadget_busid", "gw"),
        files={"testusb": testusb_binary},
    )
    certs = await make_demo_certs(tmp_path / "certs")
    async with host_processes(tmp_path / "logs") as procs:
        pair = await start_gateway_pair(procs, certs, upstream_port=guest.hostfwd_port)
        guest.params["RK_CLIENT_PORT"] = pair.client_port
        res = await guest.arun(timeout=400)
        report_problems(procs, timings)
        check_host_processes(procs, res)
    cases = case_results(res, "gw")
    (tmp_path / "cases.txt").write_text(summary(cases))
    print(summary(cases))
    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    record_cases(timings, "gadget", cases)
    assert (res.get("gw_drivers") or "").endswith(":usbtest"), res.diagnosis()
    check_cases(res, cases, BULK_CONTROL_CASES)
    if "t_gw_tested" in res.results:
        timings("usbtest cases via gw", res.elapsed("gw_attached", "gw_tested"))
