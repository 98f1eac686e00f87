"""Configuration: one TOML file per role, command-line flags over it.

Every problem names the key it is about (`tls.cert: file not found`), so a bad
config is a one-line fix, not a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.protocol import DEFAULT_PORT, Limits

LogFormat = Literal["text", "json"]
Role = Literal["server", "client"]
DeviceLabel = Literal["none", "busid", "vidpid"]
METRICS_PORT = 9240


class ConfigError(Exception):
    """A configuration value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, key: str, default_port: int = DEFAULT_PORT) -> Address:
    """HOST:PORT, [IPv6]:PORT, or HOST alone (the default port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"{text!r} is not [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(key, f"{text!r}: put an IPv6 address in brackets, [::1]:3240")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(key, f"{text!r} has no host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(key, f"port {port_text!r} is not a number from 0 to 65535")
        port = int(port_text)
    return Address(host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TLSSettings:
    cert: Path
    key: Path
    ca: Path
    min_version: Literal["1.2", "1.3"] = "1.3"
    crl: Path | None = None  # PEM CRL from the CA; reloaded on SIGHUP like the rest
    watch: bool = True  # also reload when any of these files changes (cert renewals)
    watch_interval: float = 5.0

    @property
    def version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion.TLSv1_2 if self.min_version == "1.2" else ssl.TLSVersion.TLSv1_3


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Who may list and import what (docs/policy.md). No file: every client may."""

    file: Path | None = None
    watch: bool = True  # reload when the file changes, as well as on SIGHUP
    watch_interval: float = 2.0
    revoke_on_reload: bool = True  # close attached sessions the new policy denies
    # Device strings (serial, manufacturer, product) and, where usbip-host's devices are
    # visible, each device's endpoint layout (docs/wire-framing.md). None: not read.
    sysfs: Path | None = Path("/sys/bus/usb/devices")


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: str | None = None  # a file (appended to), "-" for stdout, unset for none


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """URB metrics and the HTTP endpoint (/metrics, /healthz, /readyz, /status)."""

    listen: Address | None = None  # no HTTP endpoint when unset
    enabled: bool = True  # per-URB accounting (RTT, results, per-session percentiles)
    device_label: DeviceLabel = "none"  # "busid" or "vidpid" adds a bounded device label
    device_label_limit: int = 64  # distinct device values; later ones become "other"
    upstream_check_interval: float = 5.0  # seconds a usbipd reachability check is reused
    status: bool = True  # /status (identities, devices) on `listen`; 404 when false
    status_listen: Address | None = None  # a second endpoint with /status, e.g. loopback
    idle_timeout: float = 5.0  # seconds an HTTP connection may wait for a request head


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    """zstd between the gateways, negotiated with TLS ALPN; both sides must want it.

    See docs/compression-and-multipath.md for what it costs and its security caveat.
    """

    algorithm: Literal["none", "zstd"] = "none"
    level: int = 3  # zstd level, 1..19 (what this gateway sends; any level decodes)

    @property
    def enabled(self) -> bool:
        return self.algorithm == "zstd"


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """What all the connections of one gateway may hold together (the `[limits]` table,
    beside the per-frame protocol limits): these bound an attacker with many connections."""

    # Connections accepted whose TLS handshake is not done yet: a pool of their own, so
    # silent connections cannot take the places of sessions (`max_connections`).
    max_handshakes: int = 128
    max_handshakes_per_source: int = 16  # per client IP address
    # Partial frames held across all sessions (each one may hold up to a transfer).
    max_buffered_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """The TCP connection between the gateways."""

    mptcp: bool = False  # IPPROTO_MPTCP sockets; plain TCP if the kernel refuses


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    """Server: bind devices to usbip-host as they appear (docs/zero-touch.md)."""

    enabled: bool = False
    interval: float = 1.0  # seconds between sysfs scans
    sysfs: Path = Path("/sys")
    method: Literal["command", "sysfs"] = "command"  # `usbip bind -b`, or the sysfs files
    usbip: tuple[str, ...] = ("usbip",)  # the usbip command (argv prefix)
    hide: tuple[str, ...] = ()  # rule attributes (policy language); matching devices stay


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Server: announce the gateway with DNS-SD over mDNS (docs/zero-touch.md)."""

    announce: bool = False
    name: str = ""  # instance name; the host name when empty
    interfaces: tuple[str, ...] = ()  # addresses to announce on; all when empty


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Client: attach the selected devices of the server by itself (docs/zero-touch.md)."""

    enabled: bool = False
    interval: float = 1.0  # seconds between device lists while the link is up
    backoff_max: float = 30.0  # the longest wait between tries while it is down
    select: tuple[str, ...] = ("allow",)  # policy rules; `allow` attaches
    usbip: tuple[str, ...] = ("usbip",)
    vhci: Path = Path("/sys/devices/platform")  # where vhci_hcd.N/status are
    state_dir: Path = Path("/var/run/vhci_hcd")  # what `usbip attach` records per port


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The server gateway: mutual TLS in, usbipd on loopback out."""

    tls: TLSSettings
    listen: tuple[Address, ...] = (Address("0.0.0.0", DEFAULT_PORT),)
    upstream: Address = Address("127.0.0.1", DEFAULT_PORT)
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0  # from handshake to the op request
    connect_timeout: float = 5.0
    max_connections: int = 1024  # beyond this, new connections are closed at once
    shutdown_timeout: float = 30.0  # SIGTERM: how long open sessions may take to end
    # Attached sessions with no byte either way this long are closed; None: never (a
    # USB device may be idle for hours).
    attached_idle_timeout: float | None = None
    limits: Limits = field(default_factory=Limits)
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    exporter: ExporterSettings = field(default_factory=ExporterSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The client gateway: plain USB/IP on loopback in, mutual TLS out."""

    tls: TLSSettings
    server: Address
    server_name: str
    listen: tuple[Address, ...] = (Address("127.0.0.1", DEFAULT_PORT),)
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    max_connections: int = 1024
    shutdown_timeout: float = 30.0
    # A session still in the op phase (before its import) with no byte either way this
    # long is closed. The server gateway bounds its op phase with `request_timeout`.
    op_idle_timeout: float = 30.0
    attached_idle_timeout: float | None = None
    limits: Limits = field(default_factory=Limits)
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)


# ------------------------------------------------------------------ reading


class _Table:
    """A TOML table being read: typed getters that name the key, unknown keys refused."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        self._seen.add(name)
        return self._data.get(name)

    def table(self, name: str) -> _Table:
        value = self.raw(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(self.key(name), "must be a table")
        return _Table(value, f"{self.key(name)}.")

    def string(self, name: str, default: str | None = None) -> str:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise ConfigError(self.key(name), "is required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"must be a non-empty string, not {value!r}")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            raise ConfigError(self.key(name), f"{value!r} is not one of {', '.join(options)}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number of seconds, not {value!r}")
        if value <= minimum:
            raise ConfigError(self.key(name), f"must be greater than {minimum:g}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, not {value!r}")
        return value

    def integer(
        self, name: str, default: int, *, minimum: int = 1, maximum: int = 2**31 - 1
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, not {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(self.key(name), f"{value} is outside {minimum}..{maximum}")
        return value

    def optional_number(self, name: str) -> float | None:
        """Seconds, or None when the key is absent (the feature is off)."""
        return self.number(name, 0.0) if self.has(name) else None

    def optional_address(self, name: str, default_port: int) -> Address | None:
        if self.raw(name) is None:
            return None
        return parse_address(self.string(name), self.key(name), default_port)

    def path(self, name: str, base: Path, *, must_exist: bool = True) -> Path:
        path = Path(self.string(name))
        path = path if path.is_absolute() else base / path
        if must_exist and not path.is_file():
            raise ConfigError(self.key(name), f"file not found: {path}")
        return path

    def addresses(self, name: str, default: tuple[Address, ...]) -> tuple[Address, ...]:
        value = self.raw(name)
        if value is None:
            return default
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ConfigError(self.key(name), "must be HOST:PORT or a list of them")
        return tuple(parse_address(i, self.key(name)) for i in items)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _tls(table: _Table, base: Path) -> TLSSettings:
    tls = TLSSettings(
        cert=table.path("cert", base),
        key=table.path("key", base),
        ca=table.path("ca", base),
        min_version=table.choice("min_version", ("1.2", "1.3"), "1.3"),  # type: ignore[arg-type]
        crl=table.path("crl", base) if table.has("crl") else None,
        watch=table.boolean("watch", True),
        watch_interval=table.number("watch_interval", 5.0),
    )
    table.done()
    return tls


def _limits(table: _Table) -> tuple[Limits, ResourceLimits]:
    """The `[limits]` table: per-frame limits for the parser, gateway-wide ones."""
    d = Limits()
    limits = Limits(
        max_transfer_length=table.integer("max_transfer_length", d.max_transfer_length),
        max_iso_packets=table.integer("max_iso_packets", d.max_iso_packets, maximum=1024),
        max_pending_urbs=table.integer("max_pending_urbs", d.max_pending_urbs),
        max_devices=table.integer("max_devices", d.max_devices),
    )
    r = ResourceLimits()
    resources = ResourceLimits(
        max_handshakes=table.integer("max_handshakes", r.max_handshakes),
        max_handshakes_per_source=table.integer(
            "max_handshakes_per_source", r.max_handshakes_per_source
        ),
        max_buffered_bytes=table.integer(
            "max_buffered_bytes", r.max_buffered_bytes, minimum=1024 * 1024, maximum=2**62
        ),
    )
    table.done()
    return limits, resources


def _log(table: _Table) -> LogSettings:
    log = LogSettings(
        level=table.choice("level", ("debug", "info", "warning", "error"), "info"),  # type: ignore[arg-type]
        format=table.choice("format", ("text", "json"), "text"),  # type: ignore[arg-type]
    )
    table.done()
    return log


def _policy(table: _Table, base: Path) -> PolicySettings:
    d = PolicySettings()
    sysfs = table.raw("sysfs")
    settings = PolicySettings(
        file=table.path("file", base) if table.has("file") else None,
        watch=table.boolean("watch", d.watch),
        watch_interval=table.number("watch_interval", d.watch_interval),
        revoke_on_reload=table.boolean("revoke_on_reload", d.revoke_on_reload),
        sysfs=d.sysfs if sysfs is None else (None if sysfs == "" else Path(table.string("sysfs"))),
    )
    table.done()
    return settings


def _audit(table: _Table) -> AuditSettings:
    settings = AuditSettings(path=table.string("path") if table.has("path") else None)
    table.done()
    return settings


def _metrics(table: _Table) -> MetricsSettings:
    d = MetricsSettings()
    metrics = MetricsSettings(
        listen=table.optional_address("listen", METRICS_PORT),
        enabled=table.boolean("enabled", d.enabled),
        device_label=table.choice("device_label", ("none", "busid", "vidpid"), "none"),  # type: ignore[arg-type]
        device_label_limit=table.integer(
            "device_label_limit", d.device_label_limit, maximum=10_000
        ),
        upstream_check_interval=table.number("upstream_check_interval", 5.0),
        status=table.boolean("status", d.status),
        status_listen=table.optional_address("status_listen", METRICS_PORT),
        idle_timeout=table.number("idle_timeout", d.idle_timeout),
    )
    table.done()
    return metrics


def _compression(table: _Table) -> CompressionSettings:
    settings = CompressionSettings(
        algorithm=table.choice("algorithm", ("none", "zstd"), "none"),  # type: ignore[arg-type]
        level=table.integer("level", 3, minimum=1, maximum=19),  # zstd levels without "ultra"
    )
    table.done()
    return settings


def _transport(table: _Table) -> TransportSettings:
    settings = TransportSettings(
        mptcp=table.boolean("mptcp", False),
    )
    table.done()
    return settings


def _strings(
    table: _Table, name: str, default: tuple[str, ...], *, empty: bool = True
) -> tuple[str, ...]:
    value = table.raw(name)
    if value is None:
        return default
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(table.key(name), "must be a string or a list of non-empty strings")
    if not items and not empty:
        raise ConfigError(table.key(name), "must not be empty")
    return tuple(items)


def _rules(table: _Table, name: str, default: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """Lines in the policy language, checked now so a typo is a config error."""
    from gateway.policy import Policy, PolicyError  # noqa: PLC0415 - policy imports late

    lines = _strings(table, name, default)
    try:
        Policy.parse("".join(f"{prefix}{line}\n" for line in lines), table.key(name))
    except PolicyError as exc:
        raise ConfigError(table.key(name), f"entry {exc.line}: {exc.message}") from None
    return lines


def _exporter(table: _Table, base: Path) -> ExporterSettings:
    d = ExporterSettings()
    sysfs = Path(table.string("sysfs", str(d.sysfs)))
    settings = ExporterSettings(
        enabled=table.boolean("enabled", d.enabled),
        interval=table.number("interval", d.interval),
        sysfs=sysfs if sysfs.is_absolute() else base / sysfs,
        method=table.choice("method", ("command", "sysfs"), d.method),  # type: ignore[arg-type]
        usbip=_strings(table, "usbip", d.usbip, empty=False),
        hide=_rules(table, "hide", d.hide, "reject "),
    )
    table.done()
    return settings


def _discovery(table: _Table) -> DiscoverySettings:
    d = DiscoverySettings()
    settings = DiscoverySettings(
        announce=table.boolean("announce", d.announce),
        name=table.string("name", "") if table.has("name") else d.name,
        interfaces=_strings(table, "interfaces", d.interfaces),
    )
    table.done()
    return settings


def _agent(table: _Table, base: Path) -> AgentSettings:
    d = AgentSettings()

    def directory(name: str, default: Path) -> Path:
        path = Path(table.string(name, str(default)))
        return path if path.is_absolute() else base / path

    settings = AgentSettings(
        enabled=table.boolean("enabled", d.enabled),
        interval=table.number("interval", d.interval),
        backoff_max=table.number("backoff_max", d.backoff_max),
        select=_rules(table, "select", d.select, ""),
        usbip=_strings(table, "usbip", d.usbip, empty=False),
        vhci=directory("vhci", d.vhci),
        state_dir=directory("state_dir", d.state_dir),
    )
    table.done()
    return settings


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay dotted-key `overrides` ("tls.cert": ...) on a nested TOML mapping."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[leaf] = value
    return merged


def _common(top: _Table, section: _Table, base: Path) -> dict[str, Any]:
    """The settings both roles have, read from their own tables."""
    limits, resources = _limits(top.table("limits"))
    return {
        "tls": _tls(top.table("tls"), base),
        "handshake_timeout": section.number("handshake_timeout", 10.0),
        "connect_timeout": section.number("connect_timeout", 5.0),
        "max_connections": section.integer("max_connections", 1024),
        "shutdown_timeout": section.number("shutdown_timeout", 30.0),
        "attached_idle_timeout": section.optional_number("attached_idle_timeout"),
        "limits": limits,
        "resources": resources,
        "log": _log(top.table("log")),
        "metrics": _metrics(top.table("metrics")),
        "compression": _compression(top.table("compression")),
        "transport": _transport(top.table("transport")),
    }


def server_config(data: Mapping[str, Any], base: Path = Path(".")) -> ServerConfig:
    top = _Table(data, "")
    section = top.table("server")
    config = ServerConfig(
        **_common(top, section, base),
        listen=section.addresses("listen", (Address("0.0.0.0", DEFAULT_PORT),)),
        upstream=parse_address(section.string("upstream", "127.0.0.1:3240"), "server.upstream"),
        request_timeout=section.number("request_timeout", 30.0),
        policy=_policy(top.table("policy"), base),
        audit=_audit(top.table("audit")),
        exporter=_exporter(top.table("exporter"), base),
        discovery=_discovery(top.table("discovery")),
    )
    section.done()
    top.done()
    return config


def client_config(data: Mapping[str, Any], base: Path = Path(".")) -> ClientConfig:
    top = _Table(data, "")
    section = top.table("client")
    server = parse_address(section.string("server"), "client.server")
    config = ClientConfig(
        **_common(top, section, base),
        server=server,
        server_name=section.string("server_name", server.host),
        listen=section.addresses("listen", (Address("127.0.0.1", DEFAULT_PORT),)),
        op_idle_timeout=section.number("op_idle_timeout", 30.0),
        agent=_agent(top.table("agent"), base),
    )
    section.done()
    top.done()
    return config


def load(
    role: Role, path: Path | None, overrides: Mapping[str, Any]
) -> ServerConfig | ClientConfig:
    """Read `path` (optional), overlay the command-line `overrides`, validate."""
    data = merge(read_toml(path), overrides)
    base = path.parent if path is not None else Path(os.getcwd())
    return server_config(data, base) if role == "server" else client_config(data, base)
