"""`usbip-gateway sim`: serve the simulated devices over plain USB/IP."""

from __future__ import annotations

import argparse
import logging
import signal
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..config import Address, ConfigError, parse_address
from ..protocol import DEFAULT_PORT
from .catalog import DEVICE_NAMES, make_devices
from .gadget_zero import Pattern
from .server import SimServer, serve_sim

log = logging.getLogger("gateway.sim")


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [V6HOST]:PORT, or just HOST (port 3240), as the gateways read them."""
    try:
        address = parse_address(value, "--listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None
    return address.host, address.port


def add_sim_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `sim` command to an argparse subparsers object; it sets `func`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sim",
        help="serve simulated USB devices over USB/IP (like usbipd)",
        description="A built-in USB/IP server of simulated devices: Gadget Zero "
        "source/sink (1-1), Gadget Zero loopback (1-2) and a boot keyboard (1-3).",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"address to listen on (default 127.0.0.1:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=("all", *DEVICE_NAMES),
        default=["all"],
        help="devices to offer (default: all)",
    )
    parser.add_argument(
        "--pattern",
        type=int,
        choices=[int(p) for p in Pattern],
        default=int(Pattern.ZEROS),
        help="source/sink data pattern: 0 zeros, 1 mod 63 (as usbtest's), 2 unchecked",
    )
    parser.add_argument(
        "--sysfs",
        type=Path,
        metavar="DIR",
        help="publish the devices' strings and endpoint layout here in sysfs's "
        "layout (DIR/BUSID/serial ...), for a server gateway's policy.sysfs "
        "(default: not published)",
    )
    parser.set_defaults(func=run_sim)
    return parser


def run_sim(args: argparse.Namespace) -> int:
    names = DEVICE_NAMES if "all" in args.devices else tuple(args.devices)
    server = SimServer(make_devices(names, pattern=args.pattern))
    if args.sysfs is not None:
        server.publish_sysfs(args.sysfs)
    host, port = args.listen
    failed = False
    try:
        trio.run(_main, server, host, port)
    except* KeyboardInterrupt:
        log.info("interrupted, stopping")
    except* OSError as group:
        log.error("cannot listen on %s: %s", Address(host, port), group.exceptions[0])
        failed = True
    return 1 if failed else 0


async def _main(server: SimServer, host: str, port: int) -> None:
    # SIGTERM ends it with status 0. Needed, not only tidy: as a container's PID 1 the
    # process gets no default action for SIGTERM, and `podman stop` would wait out its
    # timeout and kill it.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_sim, server, host=host, port=port))
            async for _ in signals:
                log.info("SIGTERM received, stopping")
                nursery.cancel_scope.cancel()
