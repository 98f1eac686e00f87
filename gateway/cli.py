"""`usbip-gateway`: the command line of both gateways, the simulator and the tooling."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from gateway import __version__
from gateway.companions.agent import run_companions
from gateway.companions.discovery import add_discover_parser
from gateway.config import ClientConfig, ConfigError, ServerConfig, load
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.fd_limit import FdLimitError, fit_fd_limit
from gateway.edges.reloading import reload_tls
from gateway.edges.server_gateway import ServerGateway
from gateway.logs import setup_logging
from gateway.pki.cli import add_certs_parser
from gateway.policy import PolicyError
from gateway.policy.cli import add_policy_parser
from gateway.sim.cli import add_sim_parser
from gateway.transport.tls import TLSConfigError

log = logging.getLogger("gateway")


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument(
        "--listen", action="append", metavar="HOST:PORT", help="address to listen on (repeatable)"
    )
    parser.add_argument("--cert", help="this gateway's certificate (PEM)")
    parser.add_argument("--key", help="this gateway's private key (PEM)")
    parser.add_argument("--ca", help="CA certificate(s) the peer's certificate must chain to")
    parser.add_argument("--crl", help="PEM revocation list from the CA (reloaded on SIGHUP)")
    parser.add_argument("--tls-min-version", choices=("1.2", "1.3"), help="default 1.3")
    parser.add_argument("--handshake-timeout", type=float, metavar="SECONDS")
    parser.add_argument("--connect-timeout", type=float, metavar="SECONDS")
    parser.add_argument("--max-transfer-length", type=int, metavar="BYTES")
    parser.add_argument("--max-pending-urbs", type=int)
    parser.add_argument("--max-connections", type=int, help="default 1024")
    parser.add_argument(
        "--shutdown-timeout", type=float, metavar="SECONDS", help="SIGTERM drain (30)"
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("text", "json"))
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz and /status here (default: off)",
    )
    parser.add_argument(
        "--metrics-no-status",
        dest="metrics_status",
        action="store_const",
        const=False,
        help="answer 404 for /status on --metrics-listen (it names identities and devices)",
    )
    parser.add_argument(
        "--metrics-status-listen",
        metavar="HOST:PORT",
        help="a second endpoint that serves /status too, e.g. 127.0.0.1:9242 (default: off)",
    )
    parser.add_argument(
        "--metrics-device-label",
        choices=("none", "busid", "vidpid"),
        help="add a bounded device label to URB metrics (default none)",
    )
    parser.add_argument(
        "--compression",
        choices=("none", "zstd"),
        help="zstd between the gateways if the peer wants it too (default none)",
    )
    parser.add_argument(
        "--compression-level", type=int, metavar="N", help="zstd level 1..19 (default 3)"
    )
    parser.add_argument(
        "--mptcp",
        action="store_const",
        const=True,
        help="MPTCP between the gateways (TCP if the kernel refuses; default off)",
    )


def _overrides(role: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        f"{role}.listen": args.listen,
        "tls.cert": args.cert,
        "tls.key": args.key,
        "tls.ca": args.ca,
        "tls.min_version": args.tls_min_version,
        "tls.crl": args.crl,
        f"{role}.handshake_timeout": args.handshake_timeout,
        f"{role}.connect_timeout": args.connect_timeout,
        f"{role}.max_connections": args.max_connections,
        f"{role}.shutdown_timeout": args.shutdown_timeout,
        "limits.max_transfer_length": args.max_transfer_length,
        "limits.max_pending_urbs": args.max_pending_urbs,
        "log.level": args.log_level,
        "log.format": args.log_format,
        "metrics.listen": args.metrics_listen,
        "metrics.device_label": args.metrics_device_label,
        "metrics.status": args.metrics_status,
        "metrics.status_listen": args.metrics_status_listen,
        "compression.algorithm": args.compression,
        "compression.level": args.compression_level,
        "transport.mptcp": args.mptcp,
    }


def reload(gateway: ServerGateway | ClientGateway) -> None:
    """What SIGHUP does: certificates and CA for new connections, and the policy."""
    reload_tls(gateway.tls)
    if isinstance(gateway, ServerGateway):
        gateway.reload_policy()


async def _signals(
    gateway: ServerGateway | ClientGateway, cancel: trio.CancelScope, outcome: list[int]
) -> None:
    """SIGHUP: reload. SIGTERM/SIGINT: drain, then stop (exit 1 if the drain timed out)."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload(gateway)
            else:
                log.info(
                    "%s received: no new connections; waiting up to %gs for %d open ones",
                    signal.Signals(signum).name,
                    gateway.config.shutdown_timeout,
                    gateway.acceptor.active,
                )
                clean = await gateway.shutdown()
                outcome.append(0 if clean else 1)
                cancel.cancel()
                return


async def _run(gateway: ServerGateway | ClientGateway) -> int:
    outcome: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, gateway, nursery.cancel_scope, outcome)
        listeners = await nursery.start(gateway.serve)
        await nursery.start(run_companions, gateway, listeners)
    return outcome[0] if outcome else 0


def _load_or_exit(role: str, args: argparse.Namespace) -> ServerConfig | ClientConfig | None:
    try:
        return load(role, args.config, _overrides(role, args) | _role_overrides(role, args))  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"usbip-gateway {role}: configuration error: {exc}", file=sys.stderr)
        return None


def _role_overrides(role: str, args: argparse.Namespace) -> dict[str, Any]:
    if role == "server":
        return {
            "server.upstream": args.upstream,
            "server.request_timeout": args.request_timeout,
            "policy.file": args.policy,
            "audit.path": args.audit_log,
        }
    return {
        "client.server": args.server,
        "client.server_name": args.server_name,
        "agent.enabled": args.agent,
    }


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.command, args)
    if config is None:
        return 2
    setup_logging(config.log.level, config.log.format)
    try:
        fitted = fit_fd_limit(config.max_connections, config.resources.max_handshakes)
    except FdLimitError as exc:
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, max_connections=fitted)
    try:
        gateway = (
            ServerGateway(config) if isinstance(config, ServerConfig) else ClientGateway(config)
        )
    except (TLSConfigError, PolicyError) as exc:
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the policy file cannot be read
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(_run, gateway)
    except OSError as exc:
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usbip-gateway",
        description="Mutual-TLS gateway pair for Linux USB/IP, with per-URB visibility.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = sub.add_parser(
        "server", help="the server gateway: mutual TLS in, usbipd on loopback out"
    )
    _common_flags(server)
    server.add_argument("--upstream", metavar="HOST:PORT", help="usbipd (default 127.0.0.1:3240)")
    server.add_argument("--request-timeout", type=float, metavar="SECONDS")
    server.add_argument("--policy", metavar="FILE", help="access policy (docs/policy.md)")
    server.add_argument("--audit-log", metavar="FILE", help='JSON-lines audit log, "-" for stdout')
    server.set_defaults(func=_cmd_gateway)

    client = sub.add_parser(
        "client", help="the client gateway: plain USB/IP on loopback in, mutual TLS out"
    )
    _common_flags(client)
    client.add_argument("--server", metavar="HOST:PORT", help="the server gateway")
    client.add_argument(
        "--server-name", help="name the server certificate must carry (default: its host)"
    )
    client.add_argument(
        "--agent",
        action="store_const",
        const=True,
        help="attach the server's selected devices by itself ([agent], docs/zero-touch.md)",
    )
    client.set_defaults(func=_cmd_gateway)

    add_certs_parser(sub)
    add_policy_parser(sub)
    add_sim_parser(sub)
    add_discover_parser(sub)
    from gateway.demo import add_demo_parser  # noqa: PLC0415 - the demo pulls in everything

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("info")  # commands with a log config replace this
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
