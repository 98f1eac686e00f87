"""`usbip-gateway demo`: the whole path on one machine, with no USB hardware.

Simulated devices behind a server gateway, a client gateway in front of it, fresh
certificates between them, and a self-check that drives a device through all of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from gateway.commands import EXIT_UNAVAILABLE, leaves
from gateway.config import (
    Address,
    ClientConfig,
    NmosSettings,
    PolicySettings,
    ServerConfig,
    TLSSettings,
    TransportSettings,
)
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.logs import setup_logging
from gateway.pki.ca import PKIError, make_demo_pki
from gateway.protocol import ECONNRESET, Direction
from gateway.sim.device import SimDevice
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.transport.sockets import ListenError
from gateway.usbip.importer import import_device, list_devices

log = logging.getLogger("gateway.demo")

LOOPBACK = "127.0.0.1"
ANY_LOOPBACK_PORT = Address(LOOPBACK, 0)
LOOPBACK_BUSID = "1-2"  # the simulator's Gadget Zero loopback device
BULK_OUT, BULK_IN = 1, 1  # its endpoints 0x01 and 0x81


@dataclass
class Stack:
    sim: SimServer
    server: ServerGateway
    client: ClientGateway
    sim_address: Address
    server_address: Address
    client_address: Address


async def start_stack(
    nursery: trio.Nursery,
    server_tls: TLSSettings,
    client_tls: TLSSettings,
    *,
    client_listen: Address = ANY_LOOPBACK_PORT,
    devices: list[SimDevice] | None = None,
    transport: TransportSettings | None = None,
    policy: Path | None = None,
    server_nmos: NmosSettings | None = None,
    client_nmos: NmosSettings | None = None,
) -> Stack:
    """Start simulator, server gateway and client gateway, all on loopback; `policy`: the
    server gateway's policy file (none: every client may use every device); `*_nmos`:
    each gateway's `[nmos]` table (its Node is started by the caller)."""
    transport = transport or TransportSettings()
    sim: SimServer = await nursery.start(partial(serve_sim, devices, host=LOOPBACK, port=0))
    sim_address = Address(*sim.addresses[0])
    server = ServerGateway(
        ServerConfig(
            tls=server_tls,
            listen=(ANY_LOOPBACK_PORT,),
            upstream=sim_address,
            transport=transport,
            # The simulator's devices are not in this host's sysfs (a real device with the
            # same bus id may be): the gateway learns their endpoints in the session.
            policy=PolicySettings(file=policy, sysfs=None),
            nmos=server_nmos or NmosSettings(),
        ),
        strings=sim,
    )
    server_address = local_address((await nursery.start(server.serve))[0])
    client = ClientGateway(
        ClientConfig(
            tls=client_tls,
            server=server_address,
            server_name="localhost",
            listen=(client_listen,),
            transport=transport,
            nmos=client_nmos or NmosSettings(),
        )
    )
    client_address = local_address((await nursery.start(client.serve))[0])
    return Stack(sim, server, client, sim_address, server_address, client_address)


async def self_check(address: Address, payload_size: int = 64 * 1024) -> list[str]:
    """Drive the loopback device through `address`; raise AssertionError on a mismatch."""
    report: list[str] = []
    devices = await list_devices(await trio.open_tcp_stream(address.host, address.port))
    listed = ", ".join(
        f"{d.info.busid} ({d.info.id_vendor:04x}:{d.info.id_product:04x})" for d in devices
    )
    report.append(f"listed {len(devices)} devices through both gateways: {listed}")

    device = await import_device(
        await trio.open_tcp_stream(address.host, address.port), LOOPBACK_BUSID
    )
    report.append(f"imported {LOOPBACK_BUSID} (devid {device.device.devid:#x})")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        payload = os.urandom(payload_size)
        started = time.perf_counter()
        out = await device.submit(BULK_OUT, Direction.OUT, data=payload)
        back = await device.submit(BULK_IN, Direction.IN, length=payload_size)
        elapsed = time.perf_counter() - started
        if out.status != 0 or back.data != payload:
            raise AssertionError("bulk OUT then IN did not return the bytes written")
        report.append(
            f"wrote {payload_size // 1024} KiB to bulk OUT and read it back from bulk IN: "
            f"identical ({elapsed * 1000:.1f} ms)"
        )

        # Nothing written now, so this IN stays pending until it is unlinked.
        seqnum = device.next_seqnum()
        pending: list[int] = []

        async def wait_in() -> None:
            done = await device.submit(BULK_IN, Direction.IN, length=512, seqnum=seqnum)
            pending.append(done.status)

        async with trio.open_nursery() as inner:
            inner.start_soon(wait_in)
            await device.sent(seqnum)
            await device.unlink(seqnum)
        if pending != [-ECONNRESET]:
            raise AssertionError(f"unlinked URB ended with {pending}, not -ECONNRESET")
        report.append("unlinked a pending bulk IN URB: RET_UNLINK -ECONNRESET, no RET_SUBMIT")
        await device.aclose()
        nursery.cancel_scope.cancel()
    return report


def _banner(stack: Stack, directory: Path) -> str:
    c, s, d = stack.client_address, stack.server_address, stack.sim_address
    port_flag = "" if c.port == 3240 else f"--tcp-port {c.port} "
    return f"""
usbip-gateway demo is running
  simulated usbipd     {d}   (devices 1-1 source/sink, 1-2 loopback, 1-3 keyboard)
  server gateway       {s}   mutual TLS, upstream {d}
  client gateway       {c}   plain USB/IP for the usbip tool
  certificates         {directory}   (removed at exit if temporary)

Try, in another terminal:
  usbip {port_flag}list -r 127.0.0.1
  sudo modprobe vhci-hcd && sudo usbip {port_flag}attach -r 127.0.0.1 -b 1-1
Stop with Ctrl-C.
"""


async def _stop_on_signal(signals: Any, cancel: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s: stopping", signal.Signals(signum).name)
        cancel.cancel()
        return


async def _demo(directory: Path, port: int, check_only: bool) -> int:
    paths = make_demo_pki(directory, force=True)
    # Ctrl-C (and SIGTERM) end the demo as its normal end: no traceback, status 0.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            stack = await start_stack(
                nursery,
                TLSSettings(paths.server_cert, paths.server_key, paths.ca_cert),
                TLSSettings(paths.client_cert, paths.client_key, paths.ca_cert),
                client_listen=Address(LOOPBACK, port),
            )
            try:
                with trio.fail_after(30):
                    report = await self_check(stack.client_address)
            except (AssertionError, OSError, ConnectionError, trio.TooSlowError) as exc:
                print(f"self-check FAILED: {exc!r}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            print("self-check passed:")
            for line in report:
                print(f"  - {line}")
            if check_only:
                nursery.cancel_scope.cancel()
                return 0
            print(_banner(stack, directory), flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, getattr(args, "log_format", None) or "text")
    temporary = args.dir is None
    directory = args.dir or Path(tempfile.mkdtemp(prefix="usbip-gateway-demo-"))
    try:
        return trio.run(_demo, directory, args.port, args.check)
    except PKIError as exc:
        print(f"usbip-gateway demo: {exc}", file=sys.stderr)
        return 2
    except (OSError, BaseExceptionGroup) as exc:
        problems = leaves(exc)
        if not all(isinstance(problem, OSError) for problem in problems):
            raise
        for problem in problems:
            hint = " (try another --port)" if isinstance(problem, ListenError) else ""
            print(f"usbip-gateway demo: {problem}{hint}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        if temporary:  # the demo's keys go with it
            shutil.rmtree(directory, ignore_errors=True)


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="simulator + server gateway + client gateway on this machine, self-checked",
    )
    parser.add_argument("--port", type=int, default=3240, help="client gateway port")
    parser.add_argument(
        "--dir",
        type=Path,
        help="where to write the demo certificates, kept at exit "
        "(default: a temporary directory, removed at exit)",
    )
    parser.add_argument("--check", action="store_true", help="run the self-check and exit")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="least severe message logged",
    )
    parser.set_defaults(func=run_demo)
    return parser
