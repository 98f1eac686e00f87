"""The images built for real (podman, from a Debian base made offline by debootstrap) and
the gateway image run the way the chart and docs/deployment.md run it: read-only root, as
its non-root user, with no capabilities.

The HEALTHCHECK is run by `podman healthcheck run` (what a container engine does on its
timer): it passes against a serving gateway and fails when the metrics endpoint it asks
is not there."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pkitools import PKI

from .podman import Podman, wait_for

pytestmark = pytest.mark.containers

# What the chart's securityContext and docs/deployment.md ask of the gateway container.
LOCKED_DOWN = (
    "--read-only",
    "--tmpfs=/tmp:rw,size=16m,mode=1777",
    "--cap-drop=all",
    "--security-opt=no-new-privileges",
)

SERVER_TOML = """\
[server]
listen = ["127.0.0.1:3240"]
upstream = "127.0.0.1:3241"
[tls]
cert = "/etc/usbip-gateway/tls/server.pem"
key = "/etc/usbip-gateway/tls/server.key"
ca = "/etc/usbip-gateway/tls/ca.pem"
[policy]
sysfs = ""
"""
METRICS = '[metrics]\nlisten = "127.0.0.1:9240"\n'


def test_both_images_build_from_the_offline_base(podman: Podman, images: tuple[str, str]) -> None:
    gateway, usbipd = images
    inspected = json.loads(podman.out("image", "inspect", gateway))[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert inspected["Config"]["Entrypoint"] == ["usbip-gateway"]
    assert inspected["Healthcheck"]["Test"][0] == "CMD"  # kept: built in docker format
    # The usbipd image holds the kernel's userspace tools and the guard's nft.
    tools = podman.run(
        "run", "--rm", "--network=none", "--entrypoint=sh", usbipd, "-c",
        "command -v usbipd && command -v usbip && command -v nft && command -v usbipd-run",
    )  # fmt: skip
    assert tools.stdout.split() == [
        "/usr/sbin/usbipd",
        "/usr/sbin/usbip",
        "/usr/sbin/nft",
        "/usr/local/bin/usbipd-run",
    ]


def test_demo_check_passes_read_only_non_root_without_capabilities(
    podman: Podman, gateway_image: str
) -> None:
    demo = podman.run(
        "run", "--rm", "--network=none", *LOCKED_DOWN, gateway_image, "demo", "--check",
        timeout=120,
    )  # fmt: skip
    assert "self-check passed" in demo.stdout
    assert "identical" in demo.stdout
    # The same flags, looked at from inside: who runs, with what, on which root.
    inside = podman.run(
        "run", "--rm", "--network=none", *LOCKED_DOWN, "--entrypoint=sh", gateway_image,
        "-c", "id -u; id -g; grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status; "
        "touch /opt/usbip-gateway/x 2>&1 || echo read-only",
    )  # fmt: skip
    lines = inside.stdout.splitlines()
    assert lines[:2] == ["10001", "10001"]
    assert [line.split()[1] for line in lines[2:5]] == ["0000000000000000"] * 3
    assert lines[-1] == "read-only"


@pytest.fixture
def start_server(
    podman: Podman, gateway_image: str, container_pki: PKI, tmp_path: Path
) -> Iterator[Callable[[str], str]]:
    """Starts server gateway containers (no usbipd: /healthz is liveness and does not need
    one) with a given configuration; removes them at the end."""
    names: list[str] = []
    tmp_path.chmod(0o755)

    def start(toml: str) -> str:
        name = f"ugw-health-{uuid.uuid4().hex[:10]}"
        config = tmp_path / f"{name}.toml"
        config.write_text(toml)
        config.chmod(0o644)
        names.append(name)
        podman.run(
            "run", "-d", f"--name={name}", "--network=none", *LOCKED_DOWN,
            f"--volume={container_pki.ca_pem.parent}:/etc/usbip-gateway/tls:ro",
            f"--volume={config}:/etc/usbip-gateway/server.toml:ro",
            gateway_image,
        )  # fmt: skip
        return name

    yield start
    for name in names:
        podman.run("rm", "-f", "-v", "--time=0", name, check=False)


def listening(podman: Podman, name: str, port: int) -> bool:
    """Whether the container has a listening TCP socket on `port` (read from /proc)."""
    table = podman.run("exec", name, "cat", "/proc/net/tcp", check=False).stdout
    return any(
        f":{port:04X}" == fields[1][-5:] and fields[3] == "0A"
        for fields in (line.split() for line in table.splitlines()[1:])
    )


def test_healthcheck_passes_when_serving_and_fails_without_metrics(
    podman: Podman, start_server: Callable[[str], str]
) -> None:
    serving = start_server(SERVER_TOML + METRICS)
    silent = start_server(SERVER_TOML)  # the same gateway, no metrics endpoint
    for name in (serving, silent):
        wait_for(f"{name} listening on 3240", lambda name=name: listening(podman, name, 3240))
    assert listening(podman, serving, 9240)
    assert not listening(podman, silent, 9240)

    healthy = podman.run("healthcheck", "run", serving, check=False)
    assert healthy.returncode == 0, healthy.stderr
    unhealthy = podman.run("healthcheck", "run", silent, check=False)
    assert unhealthy.returncode != 0
    assert "unhealthy" in unhealthy.stdout + unhealthy.stderr
    # Both gateways are up: only the endpoint the HEALTHCHECK asks made the difference.
    states = [podman.out("inspect", "--format={{.State.Running}}", n) for n in (serving, silent)]
    assert states == ["true", "true"]


def test_simulator_as_pid_1_stops_on_sigterm(podman: Podman, gateway_image: str) -> None:
    # The pod test runs the simulator as its container's PID 1, where SIGTERM has no
    # default action: without its own handler `podman stop` would wait, then SIGKILL.
    name = f"ugw-sim-{uuid.uuid4().hex[:10]}"
    try:
        podman.run(
            "run", "-d", f"--name={name}", "--network=none", *LOCKED_DOWN, gateway_image,
            "sim", "--listen", "127.0.0.1:3241",
        )  # fmt: skip
        wait_for("the simulator listening", lambda: listening(podman, name, 3241))
        started = time.monotonic()
        podman.run("stop", "--time=30", name)
        assert time.monotonic() - started < 10
        assert podman.out("inspect", "--format={{.State.ExitCode}}", name) == "0"
    finally:
        podman.run("rm", "-f", "-v", "--time=0", name, check=False)
