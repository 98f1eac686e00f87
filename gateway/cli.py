"""`usbip-gateway`: the command line of both gateways, the simulator and the tooling."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.commands import (
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Command,
    CommandParser,
    command_named,
    leaves,
    log_options,
)

if TYPE_CHECKING:
    import trio

    from gateway.config import ClientConfig, ServerConfig
    from gateway.edges.client_gateway import ClientGateway
    from gateway.edges.reconfigure import ConfigSource
    from gateway.edges.server_gateway import ServerGateway

# The heavy modules (Trio, ssl, Prometheus, zstandard, zeroconf) are imported by the
# functions that run a command, not here: `--help` answers without them.

log = logging.getLogger("gateway")


def _overrides(role: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as dotted keys over the file."""
    from gateway.config.flags import overrides  # noqa: PLC0415

    return overrides(role, args)


def reload(gateway: ServerGateway | ClientGateway, source: ConfigSource | None = None) -> None:
    """What SIGHUP does: the configuration file reread (`source`), then the certificates,
    CA and CRL for new connections, and the policy, from the paths in force."""
    from gateway.config import ClientConfig, ServerConfig  # noqa: PLC0415
    from gateway.edges.server_gateway import ServerGateway  # noqa: PLC0415

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
    import trio  # noqa: PLC0415

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
    import trio  # noqa: PLC0415

    from gateway.companions.agent import run_companions  # noqa: PLC0415

    outcome: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, gateway, nursery.cancel_scope, outcome, source)
        listeners = await nursery.start(gateway.serve)
        await nursery.start(run_companions, gateway, listeners)
        if gateway.config.nmos.enabled:
            from gateway.nmos.node import run_nmos  # noqa: PLC0415

            await nursery.start(run_nmos, gateway, listeners)
    return outcome[0] if outcome else 0


def _load_or_exit(role: str, args: argparse.Namespace) -> ServerConfig | ClientConfig | None:
    import os  # noqa: PLC0415

    from gateway.config import ConfigError, load  # noqa: PLC0415

    try:
        return load(role, args.config, _overrides(role, args), os.environ)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"usbip-gateway {role}: configuration error: {exc}", file=sys.stderr)
        return None


def _cmd_gateway(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415

    from gateway.config import ServerConfig  # noqa: PLC0415
    from gateway.edges.client_gateway import ClientGateway  # noqa: PLC0415
    from gateway.edges.fd_limit import FdLimitError, fit_fd_limit  # noqa: PLC0415
    from gateway.edges.reconfigure import ConfigSource  # noqa: PLC0415
    from gateway.edges.server_gateway import ServerGateway  # noqa: PLC0415
    from gateway.logs import setup_logging  # noqa: PLC0415
    from gateway.policy import PolicyError  # noqa: PLC0415
    from gateway.transport.sockets import ListenError  # noqa: PLC0415
    from gateway.transport.tls import TLSConfigError  # noqa: PLC0415

    config = _load_or_exit(args.command, args)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.log.level, config.log.format)
    # What SIGHUP rereads: the same file, variables and flags.
    source = ConfigSource(
        args.command, args.config, _overrides(args.command, args), dict(os.environ), config
    )
    try:
        fitted = fit_fd_limit(config.max_connections, config.resources.max_handshakes)
    except FdLimitError as exc:
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = dataclasses.replace(config, max_connections=fitted)
    try:
        gateway = (
            ServerGateway(config) if isinstance(config, ServerConfig) else ClientGateway(config)
        )
    except (TLSConfigError, PolicyError) as exc:
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. the policy file cannot be read
        print(f"usbip-gateway {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return trio.run(_run, gateway, source)
    except (OSError, BaseExceptionGroup) as exc:
        problems = leaves(exc)
        if not all(isinstance(problem, OSError) for problem in problems):
            raise
        for problem in problems:
            print(f"usbip-gateway {args.command}: {problem}", file=sys.stderr)
        listening = all(isinstance(problem, ListenError) for problem in problems)
        return EXIT_UNAVAILABLE if listening else EXIT_FAILURE


def _add_gateway_parser(subparsers: Any, role: str) -> argparse.ArgumentParser:
    from gateway.config.flags import add_flags  # noqa: PLC0415

    parser: argparse.ArgumentParser = subparsers.add_parser(role, help=COMMANDS[role].help)
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: none)")
    add_flags(parser, role)
    parser.set_defaults(func=_cmd_gateway)
    return parser


def add_server_parser(subparsers: Any) -> argparse.ArgumentParser:
    return _add_gateway_parser(subparsers, "server")


def add_client_parser(subparsers: Any) -> argparse.ArgumentParser:
    return _add_gateway_parser(subparsers, "client")


COMMANDS: dict[str, Command] = {
    "server": Command(
        "the server gateway: mutual TLS in, usbipd on loopback out",
        "gateway.cli:add_server_parser",
    ),
    "client": Command(
        "the client gateway: plain USB/IP on loopback in, mutual TLS out",
        "gateway.cli:add_client_parser",
    ),
    "certs": Command("create and inspect gateway certificates", "gateway.pki.cli:add_certs_parser"),
    "policy": Command(
        "check a device policy file or explain a decision", "gateway.policy.cli:add_policy_parser"
    ),
    "sim": Command(
        "serve simulated USB devices over USB/IP (like usbipd)", "gateway.sim.cli:add_sim_parser"
    ),
    "discover": Command(
        "list server gateways announced on the local network (_usbip-gw._tcp.local.)",
        "gateway.companions.discovery:add_discover_parser",
    ),
    "status": Command(
        "a table of a gateway's sessions, from its /status endpoint",
        "gateway.status:add_status_parser",
    ),
    "demo": Command(
        "simulator + server gateway + client gateway on this machine, self-checked",
        "gateway.demo:add_demo_parser",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the other commands are listed but not built
    (their modules are not imported)."""
    parser = CommandParser(
        prog="usbip-gateway",
        description="Mutual-TLS gateway pair for Linux USB/IP, with per-URB visibility.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if only is None or name == only:
            command.add(sub)
        else:
            sub.add_parser(name, help=command.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_named(argv, list(COMMANDS)) or "").parse_args(argv)
    from gateway.logs import setup_logging  # noqa: PLC0415

    setup_logging(*log_options(args))  # commands with a log config replace this
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
