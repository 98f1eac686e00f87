"""The zero-touch path in one process: a device appears in the server's (fake) sysfs, the
exporter binds it (the simulated usbipd starts offering it), the agent lists it through
the gateway pair and attaches it; the link is cut and restored and it comes back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.cli import build_parser
from gateway.companions.agent import Agent, read_vhci
from gateway.companions.exporter import Exporter
from gateway.config import (
    Address,
    AgentSettings,
    ClientConfig,
    ConfigError,
    ExporterSettings,
    ServerConfig,
    client_config,
)
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.observability.http import respond
from gateway.sim.catalog import make_devices
from gateway.sim.server import SimServer, serve_sim

from ..pkitools import PKI
from .fakes import FakeSysfs, FakeUsb
from .harness import CuttableLink, FakeVhci

LOOP = "127.0.0.1"
TARGET = 5.0  # plugged on the server -> attached on the client
INTERVAL = 0.2
LOOPBACK_DEV = FakeUsb("1-2", 0x0525, 0xA4A0, interfaces=((0xFF, 0, 0),), product="loopback")
KEYBOARD = FakeUsb("1-3", 0x0627, 0x0001, interfaces=((0x03, 0x01, 0x01),), driver="usbhid")


@dataclass
class World:
    sysfs: FakeSysfs
    sim: SimServer
    exporter: Exporter
    link: CuttableLink
    client: ClientGateway
    vhci: FakeVhci
    agent: Agent


def _bound(listeners: list[object]) -> Address:
    sock = listeners[0].socket  # type: ignore[attr-defined]
    return Address(*sock.getsockname()[:2])


@pytest.fixture
async def world(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> World:
    sysfs = FakeSysfs(tmp_path / "server-sys")
    sim: SimServer = await nursery.start(partial(serve_sim, [], host=LOOP, port=0))
    catalog = {d.busid: d for d in make_devices()}

    async def usbip(argv: Sequence[str]) -> tuple[int, str]:
        """`usbip bind/unbind -b BUSID`: the device joins or leaves usbipd's list."""
        busid = argv[-1]
        if argv[1] == "bind":
            sysfs.set_driver(busid, "usbip-host")
            sim.devices[busid] = catalog[busid]
        else:
            sysfs.set_driver(busid, "usb")
            sim.devices.pop(busid, None)
        return 0, ""

    exporter = Exporter(
        ExporterSettings(enabled=True, interval=INTERVAL, sysfs=sysfs.root, hide=("class 03",)),
        runner=usbip,
    )
    # The hide list is on the device's interfaces here: the keyboard is class 00.
    exporter.hide = type(exporter.hide).parse(
        "reject with-interface one-of { 03:01:01 }\ndefault allow\n"
    )
    await nursery.start(exporter.run)

    server = ServerGateway(
        ServerConfig(
            tls=pki.server_tls(), listen=(Address(LOOP, 0),), upstream=Address(*sim.addresses[0])
        )
    )
    server_address = _bound(await nursery.start(server.serve))
    link = CuttableLink(server_address)
    await nursery.start(link.serve)

    vhci = FakeVhci(tmp_path / "client-sys", nursery)
    settings = AgentSettings(
        enabled=True,
        interval=INTERVAL,
        backoff_max=1.0,
        select=("allow id 0525:*",),
        vhci=vhci.platform,
        state_dir=vhci.state_dir,
    )
    client = ClientGateway(
        ClientConfig(
            tls=pki.client_tls(),
            server=link.address,
            server_name="localhost",
            listen=(Address(LOOP, 0),),
            agent=settings,
        )
    )
    client_address = _bound(await nursery.start(client.serve))
    agent = Agent(settings, client, client_address, runner=vhci)
    client.metrics.status_sections["agent"] = agent.status
    await nursery.start(agent.run)
    return World(sysfs, sim, exporter, link, client, vhci, agent)


async def _until_attached(world: World, busid: str, present: bool = True) -> float:
    start = trio.current_time()
    with trio.fail_after(TARGET * 2):
        while (busid in world.vhci.attached()) != present or (
            busid in world.agent.attached
        ) != present:
            await world.agent.wait_round()
    return trio.current_time() - start


async def test_plugged_device_is_attached_within_target_and_hidden_one_is_not(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await world.agent.wait_round()
    world.sysfs.plug(KEYBOARD)
    world.sysfs.plug(LOOPBACK_DEV)
    took = await _until_attached(world, "1-2")
    assert took < TARGET
    logging.getLogger("test").info("plug -> attached: %.2fs", took)
    assert "1-3" in world.exporter.hidden
    assert "1-3" not in world.sim.devices
    assert world.sim.in_use("1-2")
    assert world.vhci.calls[0][1:] == [
        "--tcp-port",
        str(world.agent.attach_to.port),
        "attach",
        "-r",
        "127.0.0.1",
        "-b",
        "1-2",
    ]
    status, _, body = await respond(world.client.metrics, "GET", "/status")
    doc = json.loads(body)
    assert status == 200
    assert doc["agent"]["link"] == "up"
    assert doc["agent"]["attached"] == [{"busid": "1-2", "port": 0}]

    # Unplugged on the server: the kernel drops the port; the agent notices.
    world.sysfs.unplug("1-2")
    world.sim.devices.pop("1-2")  # what the unbind of a removed device means to usbipd
    await world.vhci.ports[0][1].aclose()
    await _until_attached(world, "1-2", present=False)
    assert world.agent.events[-1]["event"] == "detached"


@pytest.mark.parametrize("server_side_only", [False, True], ids=["reset", "silent"])
async def test_device_comes_back_after_the_link_is_cut_and_restored(
    world: World, server_side_only: bool
) -> None:
    world.sysfs.plug(LOOPBACK_DEV)
    await _until_attached(world, "1-2")
    await world.link.cut(server_side_only=server_side_only)
    with trio.fail_after(10):
        while world.agent.link != "down" and world.sim.in_use("1-2"):
            await world.agent.wait_round()
    # Down for a while: the agent backs off (0.2, 0.4, 0.8, then the 1.0 s cap, each
    # jittered down to as little as half).
    with trio.fail_after(10):
        while world.agent.failures < 4:
            await world.agent.wait_round()
    assert 0.5 <= world.agent.retry_in <= 1.0
    world.link.restore()
    start = trio.current_time()
    if server_side_only:
        # The client's port outlives the server's end of the connection.
        assert "1-2" in world.vhci.attached()
        with trio.fail_after(TARGET * 2):
            while world.agent.reattaches == 0:
                await world.agent.wait_round()
    await _until_attached(world, "1-2")
    took = trio.current_time() - start
    logging.getLogger("test").info("restored -> attached: %.2fs", took)
    # Next try within backoff_max, then one round to attach.
    assert took < 1.0 + TARGET
    assert world.agent.link == "up"
    if server_side_only:
        # The client's port outlived the server's end: found stale and replaced.
        assert world.agent.reattaches >= 1
        assert any(c[1:2] == ["detach"] for c in world.vhci.calls)


def test_vhci_status_is_read_as_usbip_port_does(tmp_path: Path) -> None:
    platform = tmp_path / "platform" / "vhci_hcd.0"
    platform.mkdir(parents=True)
    (platform / "status").write_text(
        "hub port sta spd dev      sockfd local_busid\n"
        "hs  0000 006 002 00040003 000005 3-1\n"
        "hs  0001 004 000 00000000 000000 0-0\n"
        "hs  0002 006 002 00040004 000006 3-2\n"
    )
    (platform / "status.1").write_text(
        "hub port sta spd dev      sockfd local_busid\nss  0008 006 005 00010002 000007 4-1\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "port0").write_text("127.0.0.1 3240 1-2\n")
    (run / "port1").write_text("127.0.0.1 3240 1-9\n")  # stale record of a free port
    (run / "port8").write_text("10.0.0.5 3240 2-1\n")
    # port 2 has no record: attached by something else, not listed
    ports = read_vhci(tmp_path / "platform", run)
    assert [(p.port, p.host, p.tcp_port, p.busid) for p in ports] == [
        (0, "127.0.0.1", 3240, "1-2"),
        (8, "10.0.0.5", 3240, "2-1"),
    ]


def test_agent_settings_are_read_from_the_client_config(tmp_path: Path, pki: PKI) -> None:
    data: dict[str, object] = {
        "tls": {"cert": str(pki.client_cert), "key": str(pki.client_key), "ca": str(pki.ca_pem)},
        "client": {"server": "gw:3240"},
        "agent": {
            "enabled": True,
            "interval": 0.5,
            "select": ["reject class 03", "allow id 0781:*"],
            "usbip": ["sudo", "usbip"],
            "vhci": "fake/platform",
        },
    }
    agent = client_config(data, tmp_path).agent
    assert agent == replace(
        AgentSettings(),
        enabled=True,
        interval=0.5,
        select=("reject class 03", "allow id 0781:*"),
        usbip=("sudo", "usbip"),
        vhci=tmp_path / "fake/platform",
    )
    data["agent"] = {"select": ["allow id 0781"]}
    with pytest.raises(ConfigError, match=r"^agent\.select: entry 1: expected VID:PID"):
        client_config(data, tmp_path)


def test_command_line_has_agent_and_discover() -> None:
    parser = build_parser()
    assert parser.parse_args(["client", "--agent"]).agent is True
    assert parser.parse_args(["client"]).agent is None  # the file decides
    args = parser.parse_args(["discover", "--timeout", "1", "--interface", "127.0.0.1"])
    assert (args.timeout, args.interface, args.json) == (1.0, ["127.0.0.1"], False)
