"""An authorised but hostile client cannot smuggle a command past the server gateway to
the real usbip-host (docs/wire-framing.md; tests/protocol/test_kernel_framing.py is the
same attack against a model of the kernel).

    guest: usb-kbd (interrupt IN 0x81, no OUT endpoint) -- usbip-host -- usbipd :3240
           server gateway :3241 (host's Python in the host-root chroot; reads the
           guest's sysfs, so the layout is usbcore's own)
    host:  127.0.0.1:GW      -> guest :3241  (that server gateway)
           127.0.0.1:USBIPD  -> guest :3240  (usbipd itself: the controls, and the
                                              upstream of a second server gateway on
                                              the host, which sees no sysfs and learns
                                              the endpoints in the session)
           the hostile client (mTLS, certificate "mallory"): every session

usbip-host's receive debug log (usbip_core `usbip_debug_flag` 0x400 = stub_rx, with
dynamic debug on) dumps every header it reads (`BASE: cmd C seq S ...`). Each session
hides a complete CMD_UNLINK header (seqnum 0xDEAD....) where usbip-host would read it
as a command:

    a          guest gateway, enumerated: OUT to absent endpoint 2, 48 bytes of "payload"
    b          guest gateway, enumerated: IN to interrupt endpoint 1, 3 "ISO descriptors"
    c          host gateway (learning), before enumeration: OUT to endpoint 1, 48 bytes
    c_sysfs    guest gateway, before enumeration: the same
    control    usbipd directly: stream a  } the attacks are real: usbip-host reads
    control_b  usbipd directly: stream b  } the hidden header as a command

The guest script marks each session in the kernel log (/dev/kmsg) and waits, between
sessions, until usbip-host has released the device (usbip_status 1); the host runs a
session when the guest's `NAME-go` file appears in the share and answers `NAME-end`. A
gateway closes the session itself; usbipd does not, so for a control the host holds the
connection until the guest has seen the hidden header in the kernel log (or given up).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest
import trio

from .conftest import Timings
from .guest import Guest, GuestResult, free_port, tail, usb_kbd
from .hostile import (
    ENUMERATION_SEQNUMS,
    Attack,
    KernelSegment,
    SessionReport,
    absent_out_endpoint,
    iso_packets_on_interrupt,
    kernel_segments,
    open_mtls,
    run_session,
)
from .hostprocs import (
    REPO,
    HostProcesses,
    check_gateway_cli,
    gateway_argv,
    host_processes,
    issue_client_cert,
    make_demo_certs,
)
from .image import GuestImage

pytestmark = pytest.mark.realkernel

GUEST_TIMEOUT = 150.0
GATEWAY_PORT = 3241  # the server gateway in the guest (usbipd keeps 3240)
SHARED = "/run/rk-host"  # the share (/host) as seen inside the host-root chroot
IDENTITY = "mallory"  # an authorised client certificate
SESSION_TIMEOUT = 30.0


@dataclass(frozen=True)
class Plan:
    """One session: the stream, which way it goes, and what the gateway must log."""

    attack: Attack
    via: Literal["gateway", "learning", "usbipd"]  # the guest's gateway, the host's, none
    enumerate: bool = True
    refusal: str | None = None


PLANS: dict[str, Plan] = {
    "a": Plan(
        absent_out_endpoint("a", 0xDEAD0001),
        "gateway",
        refusal="CMD_SUBMIT refused: endpoint 2 OUT does not exist on the device",
    ),
    "b": Plan(
        iso_packets_on_interrupt("b", 0xDEAD0002),
        "gateway",
        refusal="CMD_SUBMIT refused: number_of_packets 3 on interrupt endpoint 1 IN",
    ),
    # Before enumeration: the learning gateway has not seen endpoint 1 yet; the sysfs
    # gateway knows from usbcore that there is no endpoint 1 OUT.
    "c": Plan(
        absent_out_endpoint("c", 0xDEAD0003, ep=1),
        "learning",
        enumerate=False,
        refusal="CMD_SUBMIT refused: the type of endpoint 1 OUT is not known for certain",
    ),
    "c_sysfs": Plan(
        absent_out_endpoint("c_sysfs", 0xDEAD0004, ep=1),
        "gateway",
        enumerate=False,
        refusal="CMD_SUBMIT refused: endpoint 1 OUT does not exist on the device",
    ),
    # The same streams as a and b, straight to usbipd; last.
    "control": Plan(absent_out_endpoint("control", 0xDEAD00C0), "usbipd"),
    "control_b": Plan(iso_packets_on_interrupt("control_b", 0xDEAD00C1), "usbipd"),
}
SESSIONS = tuple(PLANS)
CONTROLS = tuple(name for name, plan in PLANS.items() if plan.via == "usbipd")
REFUSED = tuple(name for name in SESSIONS if name not in CONTROLS)

SCRIPT = r"""
# usbip-host logs every header it reads: stub_rx debug (0x400) + dynamic debug.
echo 'module usbip_core +p; module usbip_host +p' > /proc/dynamic_debug/control \
    || rk_fail "cannot enable dynamic debug for usbip_core/usbip_host"
echo 0x400 > /sys/module/usbip_core/parameters/usbip_debug_flag \
    || rk_fail "cannot set usbip_debug_flag"
rk_result debug_flag "$(cat /sys/module/usbip_core/parameters/usbip_debug_flag)"

rk_hostroot_mount || exit 1
mkdir -p "$RK_HOSTROOT$RK_SHARED"
mount -o bind /host "$RK_HOSTROOT$RK_SHARED" || { rk_fail "bind /host into the chroot"; exit 1; }
rk_hostroot_run "$RK_PY" -m gateway server --listen "0.0.0.0:$RK_GATEWAY_PORT" \
    --upstream 127.0.0.1:3240 --cert "$RK_SHARED/certs/server.pem" \
    --key "$RK_SHARED/certs/server.key" --ca "$RK_SHARED/certs/ca.pem" \
    > /host/gw-server.log 2>&1 &
server_pid=$!

rk_start_usbipd
busid=$(rk_local_busid 0627 0001) || exit 1
rk_result busid "$busid"
rk_bind "$busid" || exit 1
rk_wait 90 grep -q "listening on" /host/gw-server.log \
    || { rk_fail "server gateway not listening within 90 s"; exit 1; }
rk_mark gateway_ready

rk_param() { eval "echo \"\${$1:-}\""; }
rk_kernel_read() { dmesg | grep -q "BASE: cmd $1 seq $2 "; } # CMD SEQNUM
rk_available() { [ "$(cat "/sys/bus/usb/devices/$busid/usbip_status")" = 1 ]; }
for s in $RK_SESSIONS; do
    rk_wait 20 rk_available || { rk_fail "$busid not available before session $s"; break; }
    echo "rk-hostile: begin $s" > /dev/kmsg
    rk_mark "begin_$s"
    echo "$busid" > "/host/$s-go"
    hidden=$(rk_param "RK_HIDDEN_$s")
    if [ -n "$hidden" ]; then
        # usbipd keeps the connection: the host holds it open until the kernel has read
        # the hidden header as a command (or 10 s have passed).
        rk_wait 30 test -e "/host/$s-sent" || { rk_fail "the host sent no $s"; break; }
        if rk_wait 10 rk_kernel_read 2 "$hidden"; then
            rk_result "${s}_smuggled" yes
        else
            rk_result "${s}_smuggled" no
        fi
        : > "/host/$s-release"
    fi
    rk_wait 60 test -e "/host/$s-end" || { rk_fail "the host did not finish session $s"; break; }
    rk_wait 20 rk_available || rk_fail "$busid not released after session $s"
    echo "rk-hostile: end $s" > /dev/kmsg
    rk_mark "end_$s"
done
if kill -0 "$server_pid"; then rk_result gateway_alive yes; else rk_result gateway_alive no; fi
dmesg > /host/dmesg.txt
kill "$server_pid"
"""


class HostileGuest(Guest):
    """The guest with a second port forward, to usbipd itself."""

    def __init__(
        self, image: GuestImage, workdir: Path, *, usbipd_port: int, **kwargs: Any
    ) -> None:
        super().__init__(image, workdir, **kwargs)
        self.usbipd_port = usbipd_port

    def qemu_command(self) -> list[str]:
        cmd = super().qemu_command()
        i = next(i for i, arg in enumerate(cmd) if arg.startswith("user,id=n0,"))
        cmd[i] += f",hostfwd=tcp:127.0.0.1:{self.usbipd_port}-:3240"
        return cmd


LEARNING_TOML = """\
[server]
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{upstream}"

[tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
ca = "{certs}/ca.pem"
watch = false

[policy]
sysfs = ""
"""


async def start_learning_gateway(
    procs: HostProcesses, tmp: Path, certs: Path, upstream: int
) -> int:
    """A server gateway on the host in front of the guest's usbipd: no sysfs view of the
    device, so it learns the endpoints from the session's own descriptors."""
    port = free_port()
    config = tmp / "learning.toml"
    config.write_text(LEARNING_TOML.format(port=port, upstream=upstream, certs=certs))
    await procs.start("gw-learning", gateway_argv("server", "--config", str(config)))
    return port


async def hold_open(share: Path, name: str) -> None:
    """Keep a control connection open until the guest has seen the kernel read it."""
    (share / f"{name}-sent").write_text("sent")
    while not (share / f"{name}-release").exists():
        await trio.sleep(0.05)


async def host_side(
    share: Path, certs: Path, gateway_port: int, learning_port: int, usbipd_port: int
) -> dict[str, SessionReport]:
    reports: dict[str, SessionReport] = {}
    for name in SESSIONS:
        go = share / f"{name}-go"
        while not (go.exists() and go.read_text().strip()):
            await trio.sleep(0.05)
        busid = go.read_text().strip()
        plan = PLANS[name]
        with trio.fail_after(SESSION_TIMEOUT):
            hold = None
            stream: trio.abc.Stream
            if plan.via == "usbipd":
                hold = partial(hold_open, share, name)
                stream = await trio.open_tcp_stream("127.0.0.1", usbipd_port)
            else:
                port = gateway_port if plan.via == "gateway" else learning_port
                stream = await open_mtls(port, certs, IDENTITY)
            report = await run_session(
                stream, name, busid, plan.attack, enumerate=plan.enumerate, hold=hold
            )
        reports[name] = report
        (share / f"{name}-end").write_text(json.dumps(asdict(report)))
    return reports


def session_ends(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "session end" in ln]


def diagnosis(res: GuestResult, extra: str = "") -> str:
    logs = "".join(
        f"\n--- {name} (tail) ---\n{tail(res.workdir / name, 30)}"
        for name in ("gw-server.log", "gw-learning.log")
    )
    return res.diagnosis() + logs + extra


@pytest.fixture(scope="module")
def gateway_cli() -> None:
    problem = check_gateway_cli()
    if problem:
        pytest.fail(f"the gateway CLI is not usable: {problem}", pytrace=False)


async def test_hostile_client_cannot_smuggle_a_command(
    gateway_cli: None, guest_image: GuestImage, tmp_path: Path, timings: Timings
) -> None:
    share = tmp_path / "share"
    certs = await make_demo_certs(tmp_path / "certs")
    await issue_client_cert(certs, IDENTITY)
    usbipd_port = free_port()
    guest = HostileGuest(
        guest_image,
        share,
        script=SCRIPT,
        devices=[usb_kbd()],
        hostfwd_guest_port=GATEWAY_PORT,
        host_root=True,
        params={
            "RK_PY": sys.executable,
            "RK_REPO": str(REPO),
            "RK_SHARED": SHARED,
            "RK_GATEWAY_PORT": GATEWAY_PORT,
            "RK_SESSIONS": " ".join(SESSIONS),
            **{f"RK_HIDDEN_{name}": PLANS[name].attack.hidden_seqnum for name in CONTROLS},
        },
        files={f"certs/{n}": certs / n for n in ("ca.pem", "server.pem", "server.key")},
        usbipd_port=usbipd_port,
    )
    reports: dict[str, SessionReport] = {}
    host_error: list[BaseException] = []
    async with host_processes(share) as procs:
        learning_port = await start_learning_gateway(procs, tmp_path, certs, usbipd_port)
        async with trio.open_nursery() as nursery:

            async def hostile() -> None:
                try:
                    reports.update(
                        await host_side(
                            share, certs, guest.hostfwd_port, learning_port, usbipd_port
                        )
                    )
                except (OSError, trio.TooSlowError) as exc:
                    host_error.append(exc)

            nursery.start_soon(hostile)
            res = await guest.arun(timeout=GUEST_TIMEOUT)
            nursery.cancel_scope.cancel()
        learning_exits = procs.unexpected_exits()
    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    if "t_gateway_ready" in res.results and "t_end_control_b" in res.results:
        timings("gateway ready -> all sessions", res.elapsed("gateway_ready", "end_control_b"))
    assert not host_error, f"host side failed: {host_error[0]!r}\n{diagnosis(res)}"
    res.check()
    assert not res.kernel_problems(), diagnosis(res)
    assert res["debug_flag"] == "1024", diagnosis(res)

    shown = "\n" + json.dumps({k: asdict(v) for k, v in reports.items()}, indent=1)
    dmesg = (share / "dmesg.txt").read_text(errors="replace")
    segments = kernel_segments(dmesg)
    assert set(segments) == set(SESSIONS), diagnosis(res, shown)
    seg_text = "".join(
        f"\n--- kernel, session {k} ---\n" + "\n".join(v.lines[-40:]) for k, v in segments.items()
    )

    def kernel(name: str) -> KernelSegment:
        return segments[name]

    # The controls: usbip-host read the hidden header as a command, so the attacks are
    # real and the log check can fail.
    for name in CONTROLS:
        control, attack = reports[name], PLANS[name].attack
        assert control.error is None, diagnosis(res, shown)
        assert control.enumerated, diagnosis(res, shown)
        assert res[f"{name}_smuggled"] == "yes", diagnosis(res, seg_text)
        assert kernel(name).headers == [
            *((1, s) for s in ENUMERATION_SEQNUMS),
            (1, attack.submit_seqnum),
            (2, attack.hidden_seqnum),
        ], diagnosis(res, shown + seg_text)
        unlinked = f"USBIP_CMD_UNLINK: seq {attack.unlink_target}"
        assert any(unlinked in ln for ln in kernel(name).lines), seg_text
    # (a) failed the endpoint look-up and read the header only; (b) was submitted as an
    # interrupt URB, its "ISO descriptors" left unread.
    assert kernel("control").framing_errors, seg_text
    assert all("CMD_SUBMIT: invalid epnum 2" in ln for ln in kernel("control").framing_errors)
    submitted = f"submit urb ok, seqnum {PLANS['control_b'].attack.submit_seqnum}"
    assert any(submitted in ln for ln in kernel("control_b").lines), seg_text

    # The gateway sessions: the kernel read exactly what the gateway forwarded (the
    # enumeration, or the one device-descriptor request before the attack), never the
    # hostile CMD_SUBMIT and never what followed it.
    logs = {
        "gateway": (share / "gw-server.log").read_text(errors="replace"),
        "learning": (share / "gw-learning.log").read_text(errors="replace"),
    }
    for name in REFUSED:
        plan, report, seg = PLANS[name], reports[name], kernel(name)
        assert report.error is None, diagnosis(res, shown)
        assert report.enumerated == plan.enumerate, diagnosis(res, shown)
        assert report.closed_by_peer, diagnosis(res, shown)
        assert not report.replies_after, diagnosis(res, shown)
        assert report.forwarded, diagnosis(res, shown)
        assert seg.headers == [(1, s) for s in report.forwarded], diagnosis(res, shown + seg_text)
        assert not seg.framing_errors, seg_text
        # No 0xDEAD.... number anywhere in what usbip-host logged in the session.
        assert not [
            ln for ln in seg.lines if any(int(n) >> 16 == 0xDEAD for n in re.findall(r"\d+", ln))
        ], seg_text

        # The refusal, named by the gateway that made it, once.
        assert plan.refusal is not None
        hits = [
            ln
            for ln in session_ends(logs[plan.via])
            if f"protocol error from client: {plan.refusal}" in ln
        ]
        assert len(hits) == 1, f"{name}: {plan.refusal!r} not logged once\n{diagnosis(res)}"
        assert f"peer=CN={IDENTITY} " in hits[0], hits[0]
        assert f"busid={report.busid} " in hits[0], hits[0]
        urbs = re.search(r"\burbs=(\d+)", hits[0])
        assert urbs, hits[0]
        assert int(urbs.group(1)) == len(report.forwarded), hits[0]

    # Neither gateway crashed.
    assert res["gateway_alive"] == "yes", diagnosis(res)
    assert not learning_exits, learning_exits
    for log in logs.values():
        assert "Traceback" not in log, diagnosis(res)
