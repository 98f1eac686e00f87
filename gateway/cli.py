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
from gateway.config.flags import add_flags, overrides
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.fd_limit import FdLimitError, fit_fd_limit
from gateway.edges.reconfigure import ConfigSource
from gateway.edges.server_gateway import ServerGateway
from gateway.logs import setup_logging
from gateway.pki.cli import add_certs_parser
from gateway.policy import PolicyError
from gateway.policy.cli import add_policy_parser
from gateway.sim.cli import add_sim_parser
from gateway.transport.tls import TLSConfigError

log = logging.getLogger("gateway")


def _overrides(role: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as dotted keys over the file."""
    return overrides(role, args)


def reload(gateway: ServerGateway | ClientGateway, source: ConfigSource | None = None) -> None:
    """What SIGHUP does: the configuration file reread (`source`), then the certificates,
    CA and CRL for new connections, and the policy, from the paths in force."""
    config = source.reread() if source is not None else None
    if isinstance(gateway, ServerGateway):
        gateway.reload(config if isinstance(config, ServerConfig) else None)
    else:
        gateway.reload(config if isinstance(config, ClientConfig) else None)


async def _signals(
    gateway: ServerGateway | ClientGateway,
    cancel: trio.CancelScope,
    outcome: list[int],
    source: ConfigSource | None = None,
) -> None:
    """SIGHUP: reload. SIGTERM/SIGINT: drain, then stop (exit 1 if the drain timed out)."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload(gateway, source)
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


async def _run(gateway: ServerGateway | ClientGateway, source: ConfigSource | None = None) -> int:
    outcome: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, gateway, nursery.cancel_scope, outcome, source)
        listeners = await nursery.start(gateway.serve)
        await nursery.start(run_companions, gateway, listeners)
    return outcome[0] if outcome else 0


def _load_or_exit(role: str, args: argparse.Namespace) -> ServerConfig | ClientConfig | None:
    try:
        return load(role, args.config, _overrides(role, args))  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"usbip-gateway {role}: configuration error: {exc}", file=sys.stderr)
        return None


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.command, args)
    if config is None:
        return 2
    setup_logging(config.log.level, config.log.format)
    source = ConfigSource(args.command, args.config, _overrides(args.command, args), config)
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
        return trio.run(_run, gateway, source)
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
    server.add_argument("--config", type=Path, help="TOML configuration file")
    add_flags(server, "server")
    server.set_defaults(func=_cmd_gateway)

    client = sub.add_parser(
        "client", help="the client gateway: plain USB/IP on loopback in, mutual TLS out"
    )
    client.add_argument("--config", type=Path, help="TOML configuration file")
    add_flags(client, "client")
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
