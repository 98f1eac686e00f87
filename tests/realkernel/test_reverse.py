"""Real kernel usbip through a reverse pair: the server gateway dials out.

    guest usbipd / usbip-host <-- 127.0.0.1:HOSTPORT (QEMU forward) <-- server gw
        ==dials mutual TLS==> client gw <-- (10.0.2.2:RPORT) guest vhci

The guest plays both ends of USB/IP: its usbip-host exports QEMU's storage stick, its
vhci-hcd attaches it. Between them the connection runs the other way round: the server
gateway, which would sit on an unreachable device host, opens it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from .conftest import Timings
from .guest import Guest, free_port, usb_storage
from .hostprocs import (
    HostProcesses,
    check_gateway_cli,
    gateway_argv,
    host_processes,
    make_demo_certs,
)
from .image import GuestImage
from .storage import StorageImage
from .test_gateway import check_host_processes, report_problems

pytestmark = pytest.mark.realkernel


@pytest.fixture(scope="module")
def gateway_cli() -> None:
    problem = check_gateway_cli()
    if problem:
        pytest.fail(f"the gateway CLI is not usable: {problem}", pytrace=False)


SCRIPT = """
rk_start_usbipd
busid=$(rk_local_busid 46f4 0001) || exit 1
rk_bind "$busid" || exit 1
rk_result rev_list "$(usbip --tcp-port "$RK_REVERSE_PORT" list -r 10.0.2.2 2>&1 \\
    | grep -c '(46f4:0001)')"
rk_mark rev_listed
rk_attach "$RK_REVERSE_PORT" "$busid" || exit 1
dev=$(rk_vhci_device 46f4 0001) || exit 1
rk_mark rev_attached
rk_storage_io rev "$dev"
rk_detach "$dev"
rk_result vhci_total_end "$(rk_vhci_total)"
"""


async def _issue(certs: Path, name: str) -> None:
    argv = gateway_argv(
        *("certs", "issue", "--dir", str(certs), "--kind", "both"),
        *("--name", name, "--dns", f"{name}.local"),
    )
    proc = await trio.run_process(argv, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()


async def start_reverse_pair(
    procs: HostProcesses, certs: Path, upstream_port: int, audit: Path
) -> int:
    """Client gateway taking dial-ins, then the server gateway dialing it; the client
    gateway's plain port for that server, once `usbip list` answers through it."""
    dial_in, local, forward = free_port(), free_port(), free_port()
    tls = ("--ca", str(certs / "ca.pem"))
    await procs.start(
        "gw-client-reverse",
        gateway_argv(
            "client",
            "--listen", f"127.0.0.1:{forward}",
            "--server", "127.0.0.1:9",  # the forward path, unused here
            "--reverse-listen", f"127.0.0.1:{dial_in}",
            "--reverse-server", f"device.local=0.0.0.0:{local}",
            "--cert", str(certs / "bench.pem"),
            "--key", str(certs / "bench.key"),
            *tls,
        ),
    )  # fmt: skip
    await procs.start(
        "gw-server-reverse",
        gateway_argv(
            "server",
            "--dial", f"127.0.0.1:{dial_in}",
            "--dial-name", "bench.local",
            "--upstream", f"127.0.0.1:{upstream_port}",
            "--audit-log", str(audit),
            "--cert", str(certs / "device.pem"),
            "--key", str(certs / "device.key"),
            *tls,
        ),
        ready_port=dial_in,  # it listens nowhere: ready once it can reach its peer
    )  # fmt: skip
    return local


async def test_guest_attaches_a_device_whose_server_gateway_dialed_out(
    gateway_cli: None, guest_image: GuestImage, tmp_path: Path, timings: Timings
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    stick = StorageImage.create(disk)
    guest = Guest(
        guest_image,
        tmp_path / "share",
        script=SCRIPT,
        devices=[usb_storage(stick.image)],
        params=stick.params(),
        files={"pattern_a.bin": stick.pattern_a},
    )
    certs = await make_demo_certs(tmp_path / "certs")
    await _issue(certs, "device")
    await _issue(certs, "bench")
    audit = tmp_path / "audit.jsonl"
    async with host_processes(tmp_path / "logs") as procs:
        t0 = trio.current_time()
        local = await start_reverse_pair(procs, certs, guest.hostfwd_port, audit)
        timings("reverse pair ready", trio.current_time() - t0)
        guest.params["RK_REVERSE_PORT"] = local
        res = await guest.arun(timeout=300)
        report_problems(procs, timings)
        check_host_processes(procs, res)
    res.check()
    assert res["rev_list"] == "1", res.diagnosis()
    assert res["rev_readback_sha256"] == stick.pattern_a_sha256, res.diagnosis()
    assert res["rev_region_b_sha256"] == stick.region_b_sha256, res.diagnosis()
    assert res["vhci_total_end"] == "0", res.diagnosis()
    ends = [
        record
        for record in map(json.loads, audit.read_text().splitlines())
        if record["event"] == "session_end"
    ]
    assert any(r["request"] == "import" for r in ends), ends
    assert all(r["dialer"] == "server" for r in ends), ends
    timings("qemu wall", res.wall_seconds)
    timings("attach via reverse pair", res.elapsed("rev_listed", "rev_attached"))
    timings(f"write {stick.a_mb} MiB via reverse", res.elapsed("rev_write_start", "rev_write_end"))
    timings(f"read {stick.a_mb} MiB via reverse", res.elapsed("rev_write_end", "rev_read_a_end"))
