"""Every configuration key, declared once: type, default, unit, help and flag.

A settings class is one TOML table (`[tls]`, `[metrics]`, ...); `ServerConfig` and
`ClientConfig` hold their role's own table (`[server]`, `[client]`) and the others.
docs/configuration.md is generated from here (`python3 -m gateway.config.reference`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from gateway.config.address import Address
from gateway.config.keys import (
    Boolean,
    Choice,
    Directory,
    File,
    Flag,
    HostPort,
    HostPorts,
    Integer,
    Integers,
    Key,
    NamedHostPorts,
    Rules,
    Seconds,
    Strings,
    Text,
    declare,
    setting,
)
from gateway.protocol import DEFAULT_PORT, Limits

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
# Which gateway this is (not `protocol.Role`, the USB/IP side a message comes from).
GatewayRole = Literal["server", "client"]
DeviceLabel = Literal["none", "busid", "vidpid"]
TLSVersion = Literal["1.2", "1.3"]
Algorithm = Literal["none", "zstd"]
BindMethod = Literal["command", "sysfs"]
METRICS_PORT = 9240
USBIPD_PORT = 3241  # usbipd behind the server gateway, which has the usual 3240
NMOS_PORT = 3212  # the Node and Connection APIs
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """`[tls]`: this gateway's certificate and what the peer's must chain to."""

    cert: Path = field(
        metadata=declare(File(), "this gateway's certificate (PEM)", flag=Flag("--cert"))
    )
    key: Path = field(
        metadata=declare(File(), "this gateway's private key (PEM)", flag=Flag("--key"))
    )
    ca: Path = field(
        metadata=declare(
            File(), "CA certificate(s) the peer's certificate must chain to", flag=Flag("--ca")
        )
    )
    min_version: TLSVersion = setting(
        "1.3",
        Choice(get_args(TLSVersion)),
        "oldest TLS version accepted",
        flag=Flag("--tls-min-version"),
    )
    crl: Path | None = setting(
        None,
        File(),
        "the CA's revocation list (PEM), e.g. from `certs revoke`; without it no certificate "
        "is checked for revocation. Reloaded when it changes and on SIGHUP",
        flag=Flag("--crl"),
    )
    watch: bool = setting(True, Boolean(), "also reload when one of these files changes on disk")
    watch_interval: float = setting(5.0, Seconds(), "how often the files are looked at")
    expiry_warning: int = setting(
        14,
        Integer(maximum=3650, unit="days"),
        "warn in the log this long before the certificate, the CA or the CRL expires",
    )

    @property
    def version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion.TLSv1_2 if self.min_version == "1.2" else ssl.TLSVersion.TLSv1_3


@dataclass(frozen=True, slots=True)
class LogSettings:
    """`[log]`."""

    level: LogLevel = setting(
        "info", Choice(get_args(LogLevel)), "least severe message logged", flag=Flag("--log-level")
    )
    format: LogFormat = setting(
        "text",
        Choice(get_args(LogFormat)),
        "`json`: one object per line",
        flag=Flag("--log-format"),
    )


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """`[policy]`: who may list and import what (docs/policy.md). No file: every client may."""

    file: Path | None = setting(
        None,
        File(),
        "the access policy (docs/policy.md)",
        flag=Flag("--policy"),
        default_text="none: every client allowed",
    )
    # ghostunnel's shorthands: the same policy as the one-line rule file
    # `allow client-cn one-of { ... }` (docs/policy.md).
    allow_cn: tuple[str, ...] = setting(
        (),
        Strings(),
        "instead of a file: allow clients whose certificate's common name is one of these",
        flag=Flag(
            "--allow-cn",
            repeat=True,
            metavar="NAME",
            help="allow clients whose certificate's CN is NAME, instead of a policy file "
            "(repeatable; docs/policy.md)",
        ),
        default_text="none",
    )
    allow_uri: tuple[str, ...] = setting(
        (),
        Strings(),
        "instead of a file: allow clients with one of these SAN URIs (e.g. SPIFFE IDs)",
        flag=Flag(
            "--allow-uri",
            repeat=True,
            metavar="URI",
            help="allow clients with the SAN URI URI (e.g. a SPIFFE ID), instead of a "
            "policy file (repeatable)",
        ),
        default_text="none",
    )
    allow_dns: tuple[str, ...] = setting(
        (),
        Strings(),
        "instead of a file: allow clients with one of these SAN DNS names",
        flag=Flag(
            "--allow-dns",
            repeat=True,
            metavar="NAME",
            help="allow clients with the SAN DNS name NAME, instead of a policy file (repeatable)",
        ),
        default_text="none",
    )
    watch: bool = setting(True, Boolean(), "reload when the file changes, as well as on SIGHUP")
    watch_interval: float = setting(2.0, Seconds(), "how often the file is looked at")
    revoke_on_reload: bool = setting(True, Boolean(), "close attached sessions a reload denies")
    # Also, where usbip-host's devices are visible, each device's endpoint layout
    # (docs/wire-framing.md).
    sysfs: Path | None = setting(
        Path("/sys/bus/usb/devices"),
        Directory(relative=False, empty_is_off=True),
        "where device strings (serial, manufacturer, product) are read",
    )


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """`[audit]`."""

    path: str | None = setting(
        None,
        Text(),
        'JSON-lines audit log: a file (appended to), "-" for stdout',
        flag=Flag("--audit-log", metavar="FILE"),
    )


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """`[metrics]`: URB metrics and the HTTP endpoint (/metrics, /healthz, /readyz, /status)."""

    listen: Address | None = setting(
        None,
        HostPort(METRICS_PORT),
        "HTTP endpoint: /metrics, /healthz, /readyz and /status",
        flag=Flag("--metrics-listen"),
        default_text="none (no endpoint)",
    )
    enabled: bool = setting(
        True, Boolean(), "per-URB accounting (round-trip times, results, per-session percentiles)"
    )
    device_label: DeviceLabel = setting(
        "none",
        Choice(get_args(DeviceLabel)),
        "a bounded device label on URB metrics, capped by `device_label_limit`",
        flag=Flag("--metrics-device-label"),
    )
    device_label_limit: int = setting(
        64, Integer(maximum=10_000), "distinct device label values; later ones become `other`"
    )
    upstream_check_interval: float = setting(
        5.0, Seconds(), "how long a usbipd reachability check (/readyz) is reused"
    )
    status: bool = setting(
        True,
        Boolean(),
        "`false`: /status (identities, devices) answers 404 on `listen`",
        flag=Flag(
            "--metrics-no-status",
            dest="metrics_status",
            const=False,
            help="answer 404 for /status on --metrics-listen (it names identities and devices)",
        ),
    )
    status_listen: Address | None = setting(
        None,
        HostPort(METRICS_PORT),
        "a second HTTP endpoint that serves /status too, e.g. 127.0.0.1:9242",
        flag=Flag("--metrics-status-listen"),
        default_text="none",
    )
    idle_timeout: float = setting(
        5.0, Seconds(), "an HTTP connection without a whole request head is closed after this"
    )


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    """`[compression]`: zstd between the gateways, negotiated with TLS ALPN; both sides must
    want it. See docs/compression-and-multipath.md for what it costs and its security caveat.
    """

    algorithm: Algorithm = setting(
        "none",
        Choice(get_args(Algorithm)),
        "`zstd` between the gateways if the peer wants it too",
        flag=Flag("--compression"),
    )
    level: int = setting(
        3,
        Integer(maximum=19),
        "zstd level this gateway sends with (any level decodes)",
        flag=Flag("--compression-level"),
    )

    @property
    def enabled(self) -> bool:
        return self.algorithm == "zstd"


# The `[limits]` table's per-frame keys: the protocol's own `Limits`, whose fields and
# defaults are declared in gateway/protocol (it knows nothing of configuration).
PROTOCOL_LIMIT_KEYS: dict[str, Key] = {
    "max_transfer_length": Key(
        Integer(unit="bytes"),
        "per URB; the kernel stub has no cap of its own",
        flag=Flag("--max-transfer-length"),
    ),
    "max_iso_packets": Key(Integer(maximum=1024), "ISO packets per URB (the kernel's cap)"),
    "max_pending_urbs": Key(
        Integer(), "URBs and unlinks in flight per connection", flag=Flag("--max-pending-urbs")
    ),
    "max_devices": Key(Integer(), "entries in a DEVLIST reply"),
}


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """`[limits]`, beside the per-frame protocol limits: what all the connections of one
    gateway may hold together; these bound an attacker with many connections."""

    # A pool of their own, so silent connections cannot take the places of sessions.
    max_handshakes: int = setting(
        128,
        Integer(),
        "connections in their TLS handshake, a pool apart from `max_connections`; "
        "more are closed on arrival",
    )
    max_handshakes_per_source: int = setting(16, Integer(), "of those, from one client IP address")
    max_buffered_bytes: int = setting(
        256 * MiB,
        Integer(minimum=MiB, maximum=2**62, unit="bytes"),
        "partial frames held by all sessions together; "
        "the session whose data would exceed it is closed",
    )


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """`[transport]`: the TCP connection between the gateways."""

    mptcp: bool = setting(
        False,
        Boolean(),
        "Multipath TCP sockets; plain TCP if the kernel refuses",
        flag=Flag("--mptcp", const=True),
    )


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    """`[exporter]`, server: bind devices to usbip-host as they appear (docs/zero-touch.md)."""

    enabled: bool = setting(False, Boolean(), "bind devices to usbip-host as they are plugged in")
    interval: float = setting(1.0, Seconds(), "between sysfs scans")
    sysfs: Path = setting(Path("/sys"), Directory(), "the sysfs root")
    method: BindMethod = setting(
        "command", Choice(get_args(BindMethod)), "`usbip bind -b`, or writing the sysfs files"
    )
    usbip: tuple[str, ...] = setting(
        ("usbip",), Strings(empty=False), "the usbip command (argv prefix)"
    )
    hide: tuple[str, ...] = setting(
        (), Rules("reject "), "devices matching any of these rule attributes are not exported"
    )


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """`[discovery]`, server: announce the gateway with DNS-SD over mDNS (docs/zero-touch.md)."""

    announce: bool = setting(False, Boolean(), "announce the gateway with DNS-SD over mDNS")
    name: str = setting("", Text(), "instance name", default_text="the host name")
    interfaces: tuple[str, ...] = setting(
        (), Strings(), "addresses to announce on", default_text="all"
    )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """`[agent]`, client: attach the selected devices of the server by itself
    (docs/zero-touch.md)."""

    enabled: bool = setting(
        False,
        Boolean(),
        "attach the server's selected devices by itself",
        flag=Flag(
            "--agent",
            const=True,
            help="attach the server's selected devices by itself ([agent], docs/zero-touch.md)",
        ),
    )
    interval: float = setting(1.0, Seconds(), "between device lists while the link is up")
    backoff_max: float = setting(30.0, Seconds(), "the longest wait between tries while it is down")
    select: tuple[str, ...] = setting(
        ("allow",), Rules(""), "policy rules choosing the devices; `allow` attaches"
    )
    usbip: tuple[str, ...] = setting(
        ("usbip",), Strings(empty=False), "the usbip command (argv prefix)"
    )
    vhci: Path = setting(Path("/sys/devices/platform"), Directory(), "where vhci_hcd.N/status are")
    state_dir: Path = setting(
        Path("/var/run/vhci_hcd"), Directory(), "what `usbip attach` records per port"
    )


@dataclass(frozen=True, slots=True)
class ReverseDialSettings:
    """`[reverse]`, server: dial out to client gateways instead of waiting for them, for a
    device host no one can reach (docs/reverse-connections.md)."""

    dial: tuple[Address, ...] = setting(
        (),
        HostPorts(DEFAULT_PORT),
        "server: client gateways to dial out to (their `[reverse] listen`)",
        flag=Flag("--dial", help="a client gateway to dial out to (repeatable)", repeat=True),
        default_text="none (no reverse connections)",
    )
    name: str = setting(
        "",
        Text(),
        "server: name the client gateways' certificates must carry",
        flag=Flag("--dial-name", metavar="NAME"),
        default_text="each one's host",
    )
    pool: int = setting(
        2, Integer(maximum=64), "server: idle connections kept ready per client gateway"
    )
    keepalive: float = setting(
        10.0,
        Seconds(),
        "both roles: an idle reverse connection silent this long is pinged; one that does "
        "not answer within as long again is dropped (the server then dials anew)",
    )
    backoff_max: float = setting(30.0, Seconds(), "server: the longest wait between failed dials")
    also_listen: bool = setting(
        False,
        Boolean(),
        "server: accept connections on `listen` too (otherwise it does not listen)",
    )


@dataclass(frozen=True, slots=True)
class ReverseAcceptSettings:
    """`[reverse]`, client: server gateways that dial in (docs/reverse-connections.md)."""

    listen: Address | None = setting(
        None,
        HostPort(DEFAULT_PORT),
        "client: mutual-TLS listener for server gateways dialing in",
        flag=Flag("--reverse-listen"),
        default_text="none (no dial-ins)",
    )
    servers: tuple[tuple[str, Address], ...] = setting(
        (),
        NamedHostPorts(DEFAULT_PORT),
        "client: server gateways accepted, each by a name its certificate carries (SAN DNS "
        "or URI), and the local plain USB/IP address that reaches it",
        flag=Flag(
            "--reverse-server",
            help="NAME=HOST:PORT: accept dial-ins from NAME, serve them on HOST:PORT (repeatable)",
            repeat=True,
            metavar="NAME=HOST:PORT",
        ),
    )
    pool_max: int = setting(
        8, Integer(maximum=1024), "client: idle dial-ins held per server; more are refused"
    )
    claim_timeout: float = setting(
        3.0,
        Seconds(),
        "client: how long a local connection waits for a dialed-in connection that answers",
    )
    keepalive: float = setting(
        10.0,
        Seconds(),
        "both roles: an idle reverse connection silent this long is pinged; one that does "
        "not answer within as long again is dropped (the server then dials anew)",
    )


@dataclass(frozen=True, slots=True)
class NmosSettings:
    """`[nmos]`: the gateway as an AMWA NMOS Node, the server a USB Sender and the client a
    USB Receiver (IS-04 Node API, IS-05 Connection API; docs/nmos.md)."""

    enabled: bool = setting(
        False,
        Boolean(),
        "serve the NMOS Node and Connection APIs and register with a registry",
        flag=Flag("--nmos", const=True, help="be an NMOS Node ([nmos], docs/nmos.md)"),
    )
    listen: Address = setting(
        Address("127.0.0.1", NMOS_PORT),
        HostPort(NMOS_PORT),
        "where the Node API (/x-nmos/node) and Connection API (/x-nmos/connection) listen",
        flag=Flag("--nmos-listen"),
    )
    host: str = setting(
        "",
        Text(),
        "the address the Node's hrefs and API endpoints name",
        default_text="the listen address (the host's own address when that is a wildcard)",
    )
    label: str = setting("", Text(), "the Node's and Device's label", default_text="the host name")
    seed: str = setting(
        "",
        Text(),
        "the resource ids derive from it (the same seed, the same ids after a restart)",
        default_text="the host name and the role",
    )
    registration: bool = setting(
        True,
        Boolean(),
        "find a Registration API (`registry`, else DNS-SD) and register; without one, "
        "advertise the Node for peer-to-peer",
    )
    registry: Address | None = setting(
        None,
        HostPort(80),
        "a Registration API to use, e.g. `registry.example:8010`",
        default_text="none (DNS-SD `_nmos-register._tcp`)",
    )
    heartbeat_interval: float = setting(5.0, Seconds(), "between registry heartbeats")
    legs: tuple[Address, ...] = setting(
        (),
        HostPorts(DEFAULT_PORT),
        "server: the addresses the Sender's SDP names, one per leg (two with MPTCP)",
        default_text="the first listen address",
    )
    publish_devices: bool = setting(
        False,
        Boolean(),
        "server: list the devices (ids, class, serial) and their classes in the Source",
    )
    audience: str = setting(
        "nmos",
        Text(),
        "server: the client name the policy is asked about for that list",
    )
    usb_classes: tuple[int, ...] = setting(
        (),
        Integers(maximum=255),
        "client: the USB classes the Receiver accepts",
        default_text="any",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """What both roles have; the keys here are in each role's own table."""

    tls: TLSSettings
    handshake_timeout: float = setting(
        10.0, Seconds(), "TLS handshake bound", flag=Flag("--handshake-timeout")
    )
    connect_timeout: float = setting(
        5.0,
        Seconds(),
        "TCP connect bound (usbipd / the server gateway)",
        flag=Flag("--connect-timeout"),
    )
    max_connections: int = setting(
        1024,
        Integer(),
        "sessions (TLS handshake done); more are closed on arrival, counted and logged; "
        "lowered at start to what RLIMIT_NOFILE fits (2 descriptors a session, 1 a handshake, "
        "64 spare), with one log line",
        flag=Flag("--max-connections"),
    )
    shutdown_timeout: float = setting(
        30.0,
        Seconds(),
        "SIGTERM: how long open sessions may take to end by themselves",
        flag=Flag("--shutdown-timeout"),
    )
    attached_idle_timeout: float | None = setting(
        None,
        Seconds(),
        "attached sessions with no byte either way this long are closed; "
        "off by default: a USB device may be idle for hours",
        default_text="none (never)",
    )
    limits: Limits = field(default_factory=Limits)
    resources: ResourceLimits = field(default_factory=ResourceLimits, metadata={"table": "limits"})
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    nmos: NmosSettings = field(default_factory=NmosSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig(GatewayConfig):
    """The server gateway: mutual TLS in, usbipd on loopback out."""

    listen: tuple[Address, ...] = setting(
        (Address("0.0.0.0", DEFAULT_PORT),),
        HostPorts(DEFAULT_PORT),
        "where to listen; `[::1]:3240` for IPv6",
        flag=Flag("--listen", help="address to listen on (repeatable)", repeat=True),
    )
    # Not usbipd's own default port: that is where this gateway listens.
    upstream: Address = setting(
        Address("127.0.0.1", USBIPD_PORT),
        HostPort(DEFAULT_PORT),
        "the kernel's usbipd, started with `usbipd --tcp-port 3241`; "
        "one of this gateway's own listen addresses is refused",
        flag=Flag("--upstream"),
    )
    request_timeout: float = setting(
        30.0, Seconds(), "from handshake to the op request", flag=Flag("--request-timeout")
    )
    policy: PolicySettings = field(default_factory=PolicySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    exporter: ExporterSettings = field(default_factory=ExporterSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    reverse: ReverseDialSettings = field(default_factory=ReverseDialSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig(GatewayConfig):
    """The client gateway: plain USB/IP on loopback in, mutual TLS out."""

    server: Address = field(
        metadata=declare(HostPort(DEFAULT_PORT), "the server gateway", flag=Flag("--server"))
    )
    server_name: str = field(
        metadata=declare(
            Text(),
            "name the server's certificate must carry",
            flag=Flag("--server-name", metavar="NAME"),
            default_text="the server's host",
            fallback=lambda values: values["server"].host,
        )
    )
    listen: tuple[Address, ...] = setting(
        (Address("127.0.0.1", DEFAULT_PORT),),
        HostPorts(DEFAULT_PORT),
        "where to listen; `[::1]:3240` for IPv6",
        flag=Flag("--listen", help="address to listen on (repeatable)", repeat=True),
    )
    # The server gateway bounds its op phase with `request_timeout`.
    op_idle_timeout: float = setting(
        30.0,
        Seconds(),
        "a session still in the op phase (before its import) with no byte either way "
        "this long is closed",
    )
    agent: AgentSettings = field(default_factory=AgentSettings)
    reverse: ReverseAcceptSettings = field(default_factory=ReverseAcceptSettings)
