"""Running podman for the container tests: its own containers.conf, the offline base image,
the two images built once, and free host ports."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.helpers import CONTAINER, ROOT

HERE = Path(__file__).resolve().parent
BASE_IMAGE = "localhost/usbip-gateway-ci-base:bookworm"
GATEWAY_REPOSITORY = "localhost/usbip-gateway"
USBIPD_REPOSITORY = "localhost/usbip-gateway-usbipd"
INSTALL = "apt-get install podman runc catatonit containernetworking-plugins iptables debootstrap"

# crun refuses this host kind's hybrid cgroups and podman's default ulimits; runc with
# cgroupfs works (docs: the shared container recipe). A file of the tests' own: /etc is
# left alone.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


class Podman:
    """podman with the tests' containers.conf."""

    def __init__(self, conf: Path) -> None:
        path = shutil.which("podman")
        if path is None:
            pytest.fail(f"podman is not installed: {INSTALL}", pytrace=False)
        self.path = path
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.path, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.strip()


def make_podman(directory: Path) -> Podman:
    conf = directory / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Podman(conf)


def base_image(podman: Podman) -> str:
    """The Debian base (debootstrap, cached as a tarball) in podman's storage."""
    subprocess.run(
        ["bash", str(HERE / "base-image.sh"), BASE_IMAGE],
        env=podman.env,
        check=True,
        timeout=1200,
        capture_output=True,
    )
    return BASE_IMAGE


def build(podman: Podman, containerfile: Path, context: Path, tag: str, base: str) -> str:
    # docker format: OCI images drop HEALTHCHECK. Host network: pip and apt reach their
    # indexes the way this machine does.
    podman.run(
        "build",
        "--format=docker",
        "--network=host",
        f"--build-arg=BASE_IMAGE={base}",
        "-f",
        str(containerfile),
        "-t",
        tag,
        str(context),
        timeout=1200,
    )
    return tag


def source_tag() -> str:
    """A tag from what the images are built of, so that test runs of different trees on
    one machine (run at the same time) never use each other's images."""
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "README.md", *sorted(CONTAINER.iterdir())]
    files += sorted((ROOT / "gateway").rglob("*.py")) + sorted(HERE.glob("*Containerfile"))
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return "ci-" + digest.hexdigest()[:12]


def build_images(podman: Podman) -> tuple[str, str]:
    base = base_image(podman)
    tag = source_tag()
    gateway = build(podman, CONTAINER / "Containerfile", ROOT, f"{GATEWAY_REPOSITORY}:{tag}", base)
    usbipd = build(
        podman, CONTAINER / "usbipd.Containerfile", CONTAINER, f"{USBIPD_REPOSITORY}:{tag}", base
    )
    return gateway, usbipd


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], bool], deadline: float = 60) -> None:
    """Poll a real condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.2)


def decodes_secret_data(podman: Podman, directory: Path, image: str) -> bool:
    """Whether this podman writes a Secret's base64 `data` into its volume decoded (4.3
    writes the base64 text itself)."""
    name = f"ugw-secret-probe-{os.getpid()}"
    manifest = directory / "secret-probe.yaml"
    manifest.write_text(
        f"""\
apiVersion: v1
kind: Secret
metadata: {{name: {name}}}
data: {{probe: aGVsbG8=}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  containers:
    - name: cat
      image: {image}
      command: [cat, /probe/probe]
      volumeMounts: [{{name: probe, mountPath: /probe}}]
  volumes:
    - {{name: probe, secret: {{secretName: {name}, optional: false}}}}
"""
    )
    try:
        podman.run("kube", "play", str(manifest))
        podman.run("wait", f"{name}-cat")
        written = podman.out("logs", f"{name}-cat")
    finally:
        podman.run("rm", "-f", "-v", f"{name}-cat", check=False)
        podman.run("kube", "down", str(manifest), check=False)
        podman.run("secret", "rm", name, check=False)
        podman.run("volume", "rm", "-f", name, check=False)
    assert written in ("hello", "aGVsbG8="), written
    return written == "hello"
