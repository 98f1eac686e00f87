"""deploy/systemd/'s units started for real by systemd, booted as PID 1 in a container
(`podman run --systemd=always`, on the gateway image plus Debian's systemd): the server
gateway's unit runs with its hardening in force, and a client gateway on this host lists,
imports and streams URBs through it.

What differs from a real host, and why:
- usbipd.service runs the simulator in usbipd's place (a drop-in replacing ExecStartPre
  and ExecStart, tests/containers/systemd.Containerfile): this host cannot load kernel
  modules, so neither `modprobe usbip-host` nor the kernel's usbipd can work here. Its
  sandbox settings are the unit's own.
- The container has CAP_SYS_ADMIN (and is otherwise podman's default): without it systemd
  cannot make the units' mount namespaces (ProtectSystem=, PrivateTmp=, ...) and the
  gateway's unit fails with "Failed to set up mount namespacing: Operation not supported"
  (status=226/NAMESPACE). The capability is the container's, the machine's; the gateway's
  process is checked to have none.
- IPAddressDeny=/IPAddressAllow= (usbipd.service) need cgroup v2 with BPF; on a cgroup v1
  host (this kind of machine is one) systemd ignores them. The pod test's guard and the
  unit file checks in tests/deploy/test_systemd.py cover keeping usbipd to loopback.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from gateway.config import Address, ClientConfig
from gateway.demo import self_check
from gateway.edges.client_gateway import ClientGateway
from gateway.transport.names import local_address
from tests.deploy.helpers import DEPLOY
from tests.pkitools import PKI

from .conftest import timed
from .podman import HERE, Podman, build, free_port, source_tag, wait_for

pytestmark = pytest.mark.containers

SERVER_TOML = """\
[server]
listen = ["0.0.0.0:3240"]
upstream = "127.0.0.1:3241"
[tls]
cert = "/etc/usbip-gateway/server.pem"
key = "/etc/usbip-gateway/server.key"
ca = "/etc/usbip-gateway/ca.pem"
[metrics]
listen = "127.0.0.1:9240"
[policy]
sysfs = ""
"""
UNIT = "usbip-gateway-server.service"
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range


@dataclass
class Machine:
    name: str
    host_port: int
    podman: Podman

    def sh(self, script: str, *, check: bool = True) -> str:
        return self.podman.run("exec", self.name, "sh", "-c", script, check=check).stdout.strip()

    def booted(self) -> bool:
        state = self.sh("systemctl is-system-running || true")
        return state in ("running", "degraded")


@pytest.fixture(scope="module")
def machine(
    podman: Podman, gateway_image: str, container_pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machine]:
    started = time.monotonic()
    image = build(
        podman,
        HERE / "systemd.Containerfile",
        DEPLOY,
        f"localhost/usbip-gateway-systemd:{source_tag()}",
        gateway_image,
    )
    machine = Machine(f"ugw-systemd-{uuid.uuid4().hex[:8]}", free_port(), podman)
    config = tmp_path_factory.mktemp("systemd") / "server.toml"
    config.write_text(SERVER_TOML)
    try:
        podman.run(
            "run", "-d", f"--name={machine.name}", "--systemd=always", "--cap-add=SYS_ADMIN",
            f"--publish=127.0.0.1:{machine.host_port}:3240", image,
        )  # fmt: skip
        wait_for("systemd to finish booting", machine.booted)
        # Installed as the unit's header says: keys root:usbip-gateway 0640 (the group is
        # made at boot from sysusers.d/usbip-gateway.conf).
        for path in (
            container_pki.ca_pem,
            container_pki.server_cert,
            container_pki.server_key,
            config,
        ):
            podman.run("cp", str(path), f"{machine.name}:/etc/usbip-gateway/{path.name}")
        machine.sh(
            "chown root:usbip-gateway /etc/usbip-gateway/* && chmod 0640 /etc/usbip-gateway/* "
            f"&& systemctl start {UNIT}"
        )
        wait_for(
            "the gateway under systemd to be ready",
            lambda: (
                machine.sh(
                    "python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:9240/readyz')\"",
                    check=False,
                )
                == ""
            ),
        )
        timed("systemd machine: build, boot, units started", started)
        yield machine
    finally:
        journal = podman.run("exec", machine.name, "journalctl", "--no-pager", "-b", check=False)
        print(journal.stdout[-4000:])
        podman.run("rm", "-f", "-v", "--time=0", machine.name, check=False)


def test_units_run_with_their_hardening(machine: Machine) -> None:
    assert machine.sh(f"systemctl is-active usbipd.service {UNIT}").split() == ["active"] * 2
    pid = machine.sh(f"systemctl show -p MainPID --value {UNIT}")
    status = machine.sh(f"cat /proc/{pid}/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = int(fields["Uid"].split()[0])
    assert uid in DYNAMIC_UIDS  # DynamicUser=yes
    group = int(machine.sh("getent group usbip-gateway | cut -d: -f3"))
    assert group in {int(g) for g in fields["Groups"].split()}  # SupplementaryGroups=
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # SystemCallFilter=
    mounts = machine.sh(f"cat /proc/{pid}/mountinfo").splitlines()
    options = {line.split()[4]: line.split()[5] for line in mounts}
    assert options["/"].startswith("ro")  # ProtectSystem=strict
    assert options["/tmp"].startswith("rw")  # PrivateTmp=: its own, writable
    assert machine.sh(f"cat /proc/{pid}/limits | grep 'open files'").split()[3] == "8192"


async def test_gateway_under_systemd_serves_a_client(
    machine: Machine, container_pki: PKI, nursery: trio.Nursery
) -> None:
    client = ClientGateway(
        ClientConfig(
            tls=container_pki.client_tls(),
            server=Address("127.0.0.1", machine.host_port),
            server_name="localhost",
            listen=(Address("127.0.0.1", 0),),
        )
    )
    address = local_address((await nursery.start(client.serve))[0])
    with trio.fail_after(60):
        report = await self_check(address)
    assert report[0].startswith("listed 3 devices"), report
    assert "identical" in report[2], report
