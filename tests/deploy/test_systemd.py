"""The systemd units: `systemd-analyze verify` (unit syntax, dependencies, executables),
`systemd-analyze security --offline` (exposure), and the properties that matter read from
the files."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.config import ResourceLimits, ServerConfig, parse_address
from gateway.edges.fd_limit import needed_fds

from .helpers import DEPLOY, SYSTEMD, need_tool, shutdown_timeout

UNITS = (
    "usbipd.service",
    "usbip-bind@.service",
    "usbip-gateway-server.service",
    "usbip-gateway-client.service",
    "usbip-gateway-crl.service",
    "usbip-gateway-crl.timer",
)
GATEWAYS = ("usbip-gateway-server.service", "usbip-gateway-client.service")
INSTALLED_PATH = "/opt/usbip-gateway/bin/usbip-gateway"

Unit = dict[str, dict[str, list[str]]]


def read_unit(name: str) -> Unit:
    """Sections of key -> every value given (systemd allows repeating a key)."""
    unit: Unit = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        unit[section][key].append(value)
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with the gateway's installed path pointing at this machine's
    usbip-gateway (verify checks that every command is executable)."""
    gateway = need_tool("usbip-gateway", "pip install -e . (the project itself)")
    directory = tmp_path_factory.mktemp("units")
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(INSTALLED_PATH, gateway)
        (directory / name).write_text(text)
    return directory


def analyze(unit_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    tool = need_tool("systemd-analyze", "apt-get install systemd")
    # A trailing ":" keeps the built-in search path (sysinit.target and friends).
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run([tool, *argv], capture_output=True, text=True, env=env, check=False)


def test_systemd_analyze_verify_is_silent(unit_dir: Path) -> None:
    need_tool("usbipd", "apt-get install usbip")
    need_tool("modprobe", "apt-get install kmod")
    names = [n for n in UNITS if "@." not in n] + ["usbip-bind@1-1.4.service"]
    result = analyze(unit_dir, "verify", "--man=no", *names)
    # verify exits 0 on unknown keys and typos, only printing them: silence is the check
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    ("name", "threshold"),
    [(g, 2.0) for g in GATEWAYS] + [("usbipd.service", 4.0)],
)
def test_security_exposure(unit_dir: Path, name: str, threshold: float) -> None:
    result = analyze(unit_dir, "security", "--offline=yes", "--no-pager", str(unit_dir / name))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    exposure = float(last.split(":")[1].split()[0])
    assert exposure <= threshold, last


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateway_units_are_hardened(name: str) -> None:
    service = read_unit(name)["Service"]
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ProtectKernelModules": "yes",
        "ProtectKernelTunables": "yes",
        "SystemCallArchitectures": "native",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert service[key] == [value], f"{name}: {key}={service[key]}"
    assert service["SystemCallFilter"][0] == "@system-service"
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    exec_start = one(read_unit(name), "Service", "ExecStart").split()
    role = name.removeprefix("usbip-gateway-").removesuffix(".service")
    assert exec_start == [INSTALLED_PATH, role, "--config", f"/etc/usbip-gateway/{role}.toml"]
    # module loading, if any, is the only thing outside the sandbox
    for pre in service.get("ExecStartPre", []):
        assert pre.startswith("+/sbin/modprobe ")


@pytest.mark.parametrize("name", GATEWAYS)
def test_stop_timeout_outlasts_the_sigterm_drain(name: str) -> None:
    drain = shutdown_timeout()
    assert int(one(read_unit(name), "Service", "TimeoutStopSec")) > drain


def test_server_follows_usbipd() -> None:
    unit = read_unit("usbip-gateway-server.service")["Unit"]
    assert "usbipd.service" in unit["Wants"][0].split()
    assert "usbipd.service" in unit["After"][0].split()


def test_usbipd_is_loopback_only_and_on_the_examples_upstream_port() -> None:
    unit = read_unit("usbipd.service")
    service = unit["Service"]
    assert service["IPAddressDeny"] == ["any"]
    assert service["IPAddressAllow"] == ["localhost"]
    assert service["ExecStartPre"] == ["+/sbin/modprobe usbip-host"]
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[0] == "/usr/sbin/usbipd"
    port = int(argv[argv.index("--tcp-port") + 1])
    example = tomllib.loads((DEPLOY / "config" / "server.toml").read_text())
    upstream = parse_address(example["server"]["upstream"], "server.upstream")
    assert (upstream.host, upstream.port) == ("127.0.0.1", port)
    assert (SYSTEMD / "modules-load.d" / "usbip-gateway-server.conf").read_text().split() == [
        "usbip-host"
    ]


def test_client_follows_vhci_hcd_loading() -> None:
    unit = read_unit("usbip-gateway-client.service")
    assert "systemd-modules-load.service" in unit["Unit"]["After"][0].split()
    assert unit["Service"]["ExecStartPre"] == ["+/sbin/modprobe vhci-hcd"]
    assert (SYSTEMD / "modules-load.d" / "usbip-gateway-client.conf").read_text().split() == [
        "vhci-hcd"
    ]


def test_bind_template_binds_and_unbinds_its_instance() -> None:
    service = read_unit("usbip-bind@.service")["Service"]
    assert service["ExecStart"] == ["/usr/sbin/usbip bind -b %i"]
    assert service["ExecStop"] == ["/usr/sbin/usbip unbind -b %i"]
    assert service["RemainAfterExit"] == ["yes"]


def test_sysusers_group_matches_the_units(tmp_path: Path) -> None:
    line = (SYSTEMD / "sysusers.d" / "usbip-gateway.conf").read_text().splitlines()[-1]
    kind, group, _ = line.split(maxsplit=2)
    assert (kind, group) == ("g", "usbip-gateway")
    for name in GATEWAYS:
        assert read_unit(name)["Service"]["SupplementaryGroups"] == [group]
    tool = need_tool("systemd-sysusers", "apt-get install systemd")
    root = tmp_path / "root"
    (root / "etc" / "sysusers.d").mkdir(parents=True)
    shutil.copy(SYSTEMD / "sysusers.d" / "usbip-gateway.conf", root / "etc" / "sysusers.d")
    result = subprocess.run(
        [tool, "--dry-run", f"--root={root}"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Creating group 'usbip-gateway'" in result.stderr + result.stdout


@pytest.mark.parametrize("name", GATEWAYS)
def test_the_fd_limit_fits_the_default_connection_limits(name: str) -> None:
    """The gateway cannot raise it itself (SystemCallFilter=~@resources forbids
    setrlimit), so the unit must give what the default limits need."""
    unit = read_unit(name)
    assert "~@privileged @resources" in unit["Service"]["SystemCallFilter"]
    limit = int(one(unit, "Service", "LimitNOFILE"))
    defaults = ResourceLimits()
    (max_connections,) = (f.default for f in fields(ServerConfig) if f.name == "max_connections")
    assert isinstance(max_connections, int)
    assert limit >= needed_fds(max_connections, defaults.max_handshakes)
