"""Zero-touch with the real kernel: a device plugged into the guest is exported by the
server gateway's exporter and attached by the client gateway's agent, without a hand,
and comes back by itself after the link between the gateways is cut and restored.

One guest plays both machines; the host only carries (and cuts) the link:

    guest: usb-kbd (hot-added through the QEMU monitor) -- usbip-host -- usbipd :3240
           server gateway :3241 ([exporter]) <-- hostfwd <-- host 127.0.0.1:FWD
                                                        ^
           host relay 127.0.0.1:RELAY ------------------' (stopped = link cut)
                                                        ^
    guest: client gateway --agent (10.0.2.2:RELAY) -----'   listening on 127.0.0.1:3242;
           the agent runs `usbip attach` there, vhci-hcd imports the keyboard

Both gateways run in the guest with the host's Python, from the host's root shared
read-only over 9p (a chroot, guestlib.sh `rk_hostroot_run`); the exporter and the agent
therefore see the guest's sysfs and run the guest kernel's usbip. The guest script and
the host test talk through request/done files in the 9p share: the script asks for the
plug, the cut and the restore, the host does them (QEMU monitor `device_add`, relay stop
and start) and answers; all times are the guest's uptime (rk_mark).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

from .conftest import Timings
from .guest import Guest, GuestResult, free_port, tail
from .hostprocs import REPO, check_gateway_cli, make_demo_certs
from .image import GuestImage

pytestmark = pytest.mark.realkernel

TARGET = 5.0  # plugged -> attached on vhci, and link restored -> attached again
GUEST_TIMEOUT = 150.0
SERVER_PORT = 3241  # the server gateway in the guest (usbipd keeps 3240)
CLIENT_PORT = 3242  # the client gateway's plain USB/IP listener in the guest
SHARED = "/run/rk-host"  # the per-run share (/host) as seen inside the host-root chroot
HOTPLUG = "usb-kbd,bus=xhci.0,id=hotkbd"

SERVER_TOML = f"""\
[server]
listen = "0.0.0.0:{SERVER_PORT}"
upstream = "127.0.0.1:3240"

[tls]
cert = "{SHARED}/certs/server.pem"
key = "{SHARED}/certs/server.key"
ca = "{SHARED}/certs/ca.pem"
watch = false

[exporter]
enabled = true
interval = 0.5
"""  # the guest script appends `hide = [...]` (its vhci buses) to [exporter]

CLIENT_TOML = f"""\
[client]
listen = "127.0.0.1:{CLIENT_PORT}"
server = "10.0.2.2:RELAY_PORT"
server_name = "localhost"

[tls]
cert = "{SHARED}/certs/client.pem"
key = "{SHARED}/certs/client.key"
ca = "{SHARED}/certs/ca.pem"
watch = false

[agent]
enabled = true
interval = 1.0
backoff_max = 1.0
"""

ZEROTOUCH_SCRIPT = r"""
rk_start_usbipd
rk_hostroot_mount || exit 1
mkdir -p "$RK_HOSTROOT$RK_SHARED"
mount -o bind /host "$RK_HOSTROOT$RK_SHARED" || { rk_fail "bind /host into the chroot"; exit 1; }
rk_mark mounted

# The guest is both machines: the exporter must not export what vhci imports.
hide=""
for b in /sys/devices/platform/vhci_hcd.*/usb[0-9]*; do
    n=${b##*/usb}
    hide="$hide'busid \"$n-*\"', "
done
echo "hide = [ $hide]" >> /host/server.toml
rk_result vhci_buses "$(echo /sys/devices/platform/vhci_hcd.*/usb[0-9]* | sed 's#[^ ]*/usb##g')"

rk_hostroot_run "$RK_PY" -m gateway server --config "$RK_SHARED/server.toml" \
    > /host/gw-server.log 2>&1 &
server_pid=$!
rk_hostroot_run "$RK_PY" -m gateway client --config "$RK_SHARED/client.toml" \
    > /host/gw-client.log 2>&1 &
client_pid=$!
rk_alive() { # the two gateways still run (recorded; a failure if not)
    kill -0 "$server_pid" || rk_fail "the server gateway exited"
    kill -0 "$client_pid" || rk_fail "the client gateway exited"
}
rk_wait 90 grep -q "listening on" /host/gw-server.log \
    || { rk_fail "server gateway not listening within 90 s"; exit 1; }
rk_wait 90 grep -q "listening on" /host/gw-client.log \
    || { rk_fail "client gateway not listening within 90 s"; exit 1; }
rk_wait 60 grep -q "agent: link .* up" /host/gw-client.log \
    || { rk_fail "the agent did not reach the server gateway within 60 s"; exit 1; }
rk_mark gateways_ready
rk_result vhci_before "$(rk_vhci_total)"

rk_request() { # NAME SECONDS: ask the host for NAME, wait for its answer
    : > "/host/$1-request"
    if ! rk_wait "$2" test -e "/host/$1-done"; then
        rk_fail "the host did not answer the $1 request within $2 s"
        return 1
    fi
    rk_result "host_$1" "$(cat "/host/$1-done")"
}

# (1) plug: QEMU hot-adds a keyboard; nobody in the guest touches it.
rk_mark plug_requested
rk_request plug 20 || exit 1
rk_wait 20 rk_has_usb_device 0627 0001 local \
    || { rk_fail "the hot-added keyboard did not enumerate"; exit 1; }
rk_mark plugged
local_kbd=$(rk_usb_devices 0627 0001 local | head -n 1)
rk_result local_busid "${local_kbd##*/}"
if ! rk_wait 30 rk_has_usb_device 0627 0001 vhci; then
    rk_result local_driver "$(basename "$(readlink "$local_kbd/driver")")"
    rk_fail "the keyboard was not attached on vhci within 30 s of being plugged"
    rk_alive
    exit 1
fi
rk_mark attached
rk_result local_driver "$(basename "$(readlink "$local_kbd/driver")")"
kbd=$(rk_usb_devices 0627 0001 vhci | head -n 1)
rk_wait 15 rk_has_input "$kbd" || rk_fail "no input device below $kbd"
rk_mark enumerated
rk_result attached_drivers "$(rk_interface_drivers "$kbd")"
rk_result attached_inputs "$(rk_input_names "$kbd")"

# (2) cut the link between the gateways: the vhci port must go away.
unreachable=$(grep -c "unreachable" /host/gw-client.log)
rk_unreachable_more() { [ "$(grep -c "unreachable" /host/gw-client.log)" -gt "$unreachable" ]; }
rk_request cut 20 || exit 1
rk_mark cut
rk_wait 30 rk_gone "${kbd##*/}" \
    || { rk_fail "the vhci keyboard stayed after the link was cut"; exit 1; }
rk_mark dropped
rk_wait 30 rk_unreachable_more || rk_fail "the agent did not notice the link was down"
rk_result vhci_while_cut "$(rk_vhci_total)"
rk_mark down_noticed

# (3) restore it: the agent attaches the keyboard again by itself.
rk_request restore 20 || exit 1
rk_mark restored
if ! rk_wait 30 rk_has_usb_device 0627 0001 vhci; then
    rk_fail "the keyboard was not attached again within 30 s of the link coming back"
    rk_alive
    exit 1
fi
rk_mark reattached
kbd=$(rk_usb_devices 0627 0001 vhci | head -n 1)
rk_wait 15 rk_has_input "$kbd" || rk_fail "no input device below $kbd after re-attach"
rk_mark reenumerated
rk_result reattached_drivers "$(rk_interface_drivers "$kbd")"
rk_result vhci_end "$(rk_vhci_total)"
rk_result usbip_status "$(cat "/sys/bus/usb/devices/${local_kbd##*/}/usbip_status")"
rk_alive
"""


class Relay:
    """The link between the gateways: a TCP relay on the host that can be stopped (every
    connection reset, new ones refused) and started again on the same port."""

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.target = target
        self.scope: trio.CancelScope | None = None
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, down: trio.SocketStream) -> None:
        self.connections += 1
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await down.aclose()
            return
        async with up, down, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    while data := await src.receive_some(65536):
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, down, up)
            nursery.start_soon(pump, up, down)

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()  # closes the listener and every relayed connection


async def monitor_command(socket_path: Path, command: str, timeout: float = 10.0) -> str:
    """One QEMU human-monitor command; its output (empty when it succeeded quietly)."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(str(socket_path))
        async with stream:
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"QEMU monitor closed: {buf!r}")
                buf += chunk
            await stream.send_all(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
    # The monitor echoes the command line (with terminal escapes) before its answer.
    return buf.decode(errors="replace").replace("\r", "").removesuffix("(qemu) ")


async def host_side(share: Path, monitor: Path, relay: Relay, nursery: trio.Nursery) -> None:
    """Answer the guest script's requests: plug, cut, restore (in that order)."""

    async def wait_for(name: str) -> None:
        while not (share / f"{name}-request").exists():
            await trio.sleep(0.05)

    await wait_for("plug")
    answer = await monitor_command(monitor, f"device_add {HOTPLUG}")
    failed = "rror" in answer  # "Error: ..." / "error: ..."
    (share / "plug-done").write_text(" ".join(answer.split())[-300:] if failed else "ok")
    await wait_for("cut")
    relay.stop()
    (share / "cut-done").write_text(f"ok {relay.connections} connections relayed")
    await wait_for("restore")
    await nursery.start(relay.run)
    (share / "restore-done").write_text("ok")


@pytest.fixture(scope="module")
def gateway_cli() -> None:
    problem = check_gateway_cli()
    if problem:
        pytest.fail(f"the gateway CLI is not usable: {problem}", pytrace=False)


def diagnosis(res: GuestResult) -> str:
    logs = "".join(
        f"\n--- {name} (tail) ---\n{tail(res.workdir / name, 30)}"
        for name in ("gw-server.log", "gw-client.log")
    )
    return res.diagnosis() + logs


async def test_zerotouch_plug_cut_restore(
    gateway_cli: None, guest_image: GuestImage, tmp_path: Path, timings: Timings
) -> None:
    share = tmp_path / "share"
    certs = await make_demo_certs(tmp_path / "certs")
    relay_port = free_port()
    guest = Guest(
        guest_image,
        share,
        script=ZEROTOUCH_SCRIPT,
        hostfwd_guest_port=SERVER_PORT,
        host_root=True,
        monitor=tmp_path / "monitor.sock",
        params={"RK_PY": sys.executable, "RK_REPO": str(REPO), "RK_SHARED": SHARED},
        files={
            "server.toml": SERVER_TOML.encode(),
            "client.toml": CLIENT_TOML.replace("RELAY_PORT", str(relay_port)).encode(),
            **{
                f"certs/{name}": certs / name
                for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
            },
        },
    )
    relay = Relay(relay_port, guest.hostfwd_port)
    host_error: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)

        async def answer() -> None:
            assert guest.monitor is not None
            try:
                await host_side(share, guest.monitor, relay, nursery)
            except (OSError, AssertionError, trio.TooSlowError) as exc:
                host_error.append(exc)

        nursery.start_soon(answer)
        res = await guest.arun(timeout=GUEST_TIMEOUT)
        nursery.cancel_scope.cancel()
    assert not host_error, f"host side failed: {host_error[0]!r}\n{diagnosis(res)}"

    timings("qemu wall", res.wall_seconds)
    timings("guest ready (uptime)", res.boot_seconds)
    if "t_gateways_ready" in res.results:
        timings("gateways started in guest", res.elapsed("mounted", "gateways_ready"))
    res.check()
    assert not res.kernel_problems(), diagnosis(res)
    server_log = (share / "gw-server.log").read_text(errors="replace")
    client_log = (share / "gw-client.log").read_text(errors="replace")
    assert "Traceback" not in server_log + client_log, diagnosis(res)
    assert res["host_plug"] == "ok", diagnosis(res)
    assert res["vhci_before"] == "0", diagnosis(res)
    # exported by the exporter (the guest script never binds), attached by the agent
    assert res["local_driver"] == "usbip-host", diagnosis(res)
    assert f"exporter: exported {res['local_busid']} (0627:0001" in server_log, diagnosis(res)
    assert f"agent: attached {res['local_busid']}" in client_log, diagnosis(res)
    assert ":usbhid" in res["attached_drivers"], diagnosis(res)
    assert res["attached_inputs"], diagnosis(res)
    # the cut dropped the port; the restore brought the keyboard back, once
    assert res["vhci_while_cut"] == "0", diagnosis(res)
    assert ":usbhid" in res["reattached_drivers"], diagnosis(res)
    assert res["vhci_end"] == "1", diagnosis(res)
    assert res["usbip_status"] == "2", diagnosis(res)  # SDEV_ST_USED
    exported = set(re.findall(r"exporter: exported (\S+)", server_log))
    assert exported == {res["local_busid"]}, f"exported {exported}\n{diagnosis(res)}"

    plugged = res.elapsed("plugged", "attached")
    back = res.elapsed("restored", "reattached")
    timings("hot-add asked -> attached on vhci", res.elapsed("plug_requested", "attached"))
    timings("plugged (enumerated) -> attached on vhci", plugged)
    timings("attached -> usbhid input", res.elapsed("attached", "enumerated"))
    timings("link cut -> vhci port dropped", res.elapsed("cut", "dropped"))
    timings("link restored -> attached again", back)
    timings("re-attached -> usbhid input", res.elapsed("reattached", "reenumerated"))
    assert plugged <= TARGET, f"plugged -> attached took {plugged:.1f}s\n{diagnosis(res)}"
    assert back <= TARGET, f"restored -> attached again took {back:.1f}s\n{diagnosis(res)}"
