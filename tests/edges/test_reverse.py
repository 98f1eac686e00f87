"""Reverse mode on loopback: the server gateway dials out to the client gateway.

simulator <- server gateway ==dials mTLS==> client gateway <- usbip (on the server's
own local port). Real TLS with real certificates, the real simulator, both gateways.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.companions.agent import Agent, run_companions
from gateway.config import (
    Address,
    AgentSettings,
    AuditSettings,
    CompressionSettings,
    PolicySettings,
    ReverseAcceptSettings,
    ReverseDialSettings,
    TLSSettings,
)
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.dialer import Backoff
from gateway.edges.server_gateway import ServerGateway
from gateway.observability.endpoints import respond
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import Direction, OpStatus
from gateway.sim.server import SimServer, serve_sim
from gateway.usbip.importer import ImportRefused, import_device, list_devices

from ..pkitools import LOOPBACK, PKI, client_config, issue_client, server_config, write_leaf
from ..zerotouch.harness import FakeVhci
from .cut_proxy import CutProxy

SERVER_NAME = "localhost"  # the SAN DNS name of the test server gateway's certificate
CLIENT_NAME = "client.test"  # and of the client gateway's
UNUSED = Address(LOOPBACK, 9)  # the client gateway's forward server: never dialed here
DEADLINE = 10.0


@dataclass
class Reverse:
    sim: SimServer
    server: ServerGateway
    client: ClientGateway
    dial_in: Address  # the client gateway's mutual-TLS listener for dial-ins
    local: Address  # its plain USB/IP port for the server gateway
    audit: Path


async def start_client(
    nursery: trio.Nursery,
    pki: PKI,
    *,
    pool_max: int = 8,
    claim_timeout: float = 3.0,
    names: tuple[str, ...] = (SERVER_NAME,),
    compression: CompressionSettings | None = None,
) -> ClientGateway:
    config = client_config(
        pki,
        UNUSED,
        reverse=ReverseAcceptSettings(
            listen=Address(LOOPBACK, 0),
            servers=tuple((name, Address(LOOPBACK, 0)) for name in names),
            pool_max=pool_max,
            claim_timeout=claim_timeout,
        ),
        compression=compression or CompressionSettings(),
    )
    client = ClientGateway(replace(config, listen=()))
    await nursery.start(client.serve)
    return client


async def start_server(
    nursery: trio.Nursery,
    pki: PKI,
    sim: SimServer,
    dial: Address,
    tmp_path: Path,
    *,
    tls: TLSSettings | None = None,
    policy: Path | None = None,
    keepalive: float = 10.0,
    pool: int = 2,
    name: str = CLIENT_NAME,
    compression: CompressionSettings | None = None,
) -> ServerGateway:
    config = server_config(
        pki,
        Address(*sim.addresses[0]),
        policy=PolicySettings(file=policy, sysfs=None),
        audit=AuditSettings(str(tmp_path / "audit.jsonl")),
        reverse=ReverseDialSettings(
            dial=(dial,), name=name, pool=pool, keepalive=keepalive, backoff_max=0.5
        ),
        compression=compression or CompressionSettings(),
    )
    if tls is not None:
        config = replace(config, tls=tls)
    server = ServerGateway(config, strings=sim)
    listeners = await nursery.start(server.serve)
    assert listeners == []  # reverse mode: it listens nowhere
    return server


async def eventually(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {DEADLINE}s: {what}")


def idle(gateway: ServerGateway | ClientGateway) -> int:
    sections = gateway.metrics.status_sections["reverse"]()
    return int(sum(section["idle"] for section in sections))


def metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


async def connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


@pytest.fixture
async def reverse(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> Reverse:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki)
    dial_in = client.dial_in_addresses[0]
    server = await start_server(nursery, pki, sim, dial_in, tmp_path)
    await eventually(lambda: idle(client) == 2, "two idle connections at the client gateway")
    local = client.reverse_addresses[SERVER_NAME]
    return Reverse(sim, server, client, dial_in, local, tmp_path / "audit.jsonl")


async def test_list_import_and_bulk_byte_exact_over_a_dialed_connection(
    reverse: Reverse,
) -> None:
    listed = await list_devices(await connect(reverse.local))
    assert [d.info.busid for d in listed] == ["1-1", "1-2", "1-3"]
    device = await import_device(await connect(reverse.local), "1-2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        payload = os.urandom(256 * 1024)
        sent = await device.submit(1, Direction.OUT, data=payload)
        assert sent.status == 0
        back = await device.submit(1, Direction.IN, length=len(payload))
        assert back.data == payload
        for gateway in (reverse.server, reverse.client):
            _, _, body = await respond(gateway.metrics, "GET", "/status")
            status = json.loads(body)
            (session,) = status["sessions"]
            assert (session["busid"], session["dialer"]) == ("1-2", "server")
            assert status["reverse"][0]["dialer"] == "server"
        await device.aclose()
    assert reverse.sim.imports == 1
    # Two sessions took pooled connections; the pool was refilled behind them.
    await eventually(lambda: idle(reverse.client) == 2, "the pool refilled")
    await eventually(lambda: not reverse.server.sessions, "sessions ended")
    for gateway in (reverse.server, reverse.client):
        assert (
            metric(gateway.metrics, "usbip_gateway_sessions_by_dialer_total", dialer="server") == 2
        )
    assert metric(reverse.server.metrics, "usbip_gateway_reverse_dials_total", result="connected")
    await reverse.server.shutdown(1)  # flushes the audit log
    records = [json.loads(line) for line in reverse.audit.read_text().splitlines()]
    ends = [r for r in records if r["event"] == "session_end"]
    assert [(r["request"], r["dialer"]) for r in ends] == [
        ("devlist", "server"),
        ("import", "server"),
    ]


async def test_the_policy_still_denies_on_dialed_connections(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    policy = tmp_path / "policy.rules"
    policy.write_text('allow busid "1-2" client-cn "test-client"\ndefault reject\n')
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki)
    await start_server(nursery, pki, sim, client.dial_in_addresses[0], tmp_path, policy=policy)
    await eventually(lambda: idle(client) == 2, "pool ready")
    local = client.reverse_addresses[SERVER_NAME]
    listed = await list_devices(await connect(local))
    assert [d.info.busid for d in listed] == ["1-2"]
    with pytest.raises(ImportRefused) as refused:
        await import_device(await connect(local), "1-1")
    assert refused.value.status != OpStatus.OK
    assert sim.imports == 0


async def test_a_silently_dead_link_is_replaced_and_the_next_attach_works(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki, claim_timeout=2.0)
    proxy = CutProxy(client.dial_in_addresses[0])
    await nursery.start(proxy.serve)
    server = await start_server(nursery, pki, sim, proxy.address, tmp_path, keepalive=0.5)
    await eventually(lambda: idle(server) == 2, "pool ready")
    proxy.cut()
    # Unanswered keepalives: the dialer drops its connections and dials (into the void).
    await eventually(lambda: idle(server) == 0, "dead connections noticed")
    proxy.restore()
    restored = trio.current_time()
    local = client.reverse_addresses[SERVER_NAME]
    # The client gateway may still hold the dead ones: a claim that goes unanswered is
    # dropped and the next connection is tried.
    device = await import_device(await connect(local), "1-2")
    assert trio.current_time() - restored < 5.0
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        done = await device.submit(1, Direction.OUT, data=b"after the cut")
        assert done.status == 0
        await device.aclose()
    assert metric(server.metrics, "usbip_gateway_reverse_dials_total", result="idle_lost") >= 2


async def test_no_dial_in_means_a_clear_refusal_and_nothing_reaches_usbipd(
    pki: PKI, nursery: trio.Nursery
) -> None:
    client = await start_client(nursery, pki, claim_timeout=0.2)
    local = client.reverse_addresses[SERVER_NAME]
    stream = await connect(local)
    with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError)):
        await list_devices(stream)
    await eventually(lambda: not client.sessions, "session ended")
    assert metric(client.metrics, "usbip_gateway_sessions_total", outcome="upstream_unreachable")


async def _dial_in_with(pki: PKI, client: ClientGateway, tls: TLSSettings) -> None:
    """Dial in as a server gateway with `tls` would; the client gateway should refuse."""
    from gateway.transport.tls import client_context  # noqa: PLC0415

    address = client.dial_in_addresses[0]
    tcp = await connect(address)
    ctx = client_context(tls.cert, tls.key, tls.ca)
    ctx.check_hostname = False
    stream = trio.SSLStream(tcp, ctx, server_hostname=CLIENT_NAME)
    try:
        await stream.do_handshake()
        await stream.send_all(b"?")  # a ping: a pooled connection would answer it
        with trio.fail_after(DEADLINE):
            answer = await stream.receive_some(10)
    except trio.BrokenResourceError:
        answer = b""
    finally:
        await trio.aclose_forcefully(stream)
    assert answer == b"", "the client gateway answered a connection it should refuse"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("other_ca", "handshake_failed"),
        ("client_certificate", "not_a_server_certificate"),
        ("unknown_name", "unknown_server"),
    ],
)
async def test_hostile_dial_ins_are_refused_counted_and_never_used(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery, kind: str, reason: str
) -> None:
    import trustme  # noqa: PLC0415

    client = await start_client(nursery, pki, claim_timeout=0.3)
    if kind == "other_ca":
        cert, key = write_leaf(trustme.CA().issue_cert(SERVER_NAME), tmp_path, "other")
        tls = TLSSettings(cert, key, pki.ca_pem)
    elif kind == "client_certificate":
        # clientAuth only, yet it names the accepted server.
        tls = issue_client(pki, tmp_path, "impostor", dns=(SERVER_NAME,))
    else:
        cert, key = write_leaf(pki.ca.issue_cert("elsewhere.test"), tmp_path, "elsewhere")
        tls = TLSSettings(cert, key, pki.ca_pem)
    await _dial_in_with(pki, client, tls)
    await eventually(
        lambda: (
            metric(client.metrics, "usbip_gateway_reverse_dial_ins_refused_total", reason=reason)
            == 1
        ),
        f"refusal counted as {reason}",
    )
    assert idle(client) == 0
    # A local usbip finds nothing to use.
    with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError)):
        await list_devices(await connect(client.reverse_addresses[SERVER_NAME]))


async def test_a_dial_in_flood_is_refused_at_the_handshake_limit(
    pki: PKI, nursery: trio.Nursery
) -> None:
    client = await start_client(nursery, pki)
    address = client.dial_in_addresses[0]
    silent = [await connect(address) for _ in range(40)]  # never say a TLS word
    await eventually(
        lambda: (
            metric(
                client.metrics,
                "usbip_gateway_connections_refused_total",
                limit="handshakes_per_source",
            )
            >= 40 - 16
        ),
        "the flood refused beyond max_handshakes_per_source",
    )
    assert idle(client) == 0
    for stream in silent:
        await stream.aclose()


async def test_the_pool_is_bounded(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> None:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki, pool_max=3)
    await start_server(nursery, pki, sim, client.dial_in_addresses[0], tmp_path, pool=5)
    await eventually(
        lambda: (
            metric(client.metrics, "usbip_gateway_connections_refused_total", limit="connections")
            >= 1
        ),
        "dial-ins beyond pool_max refused",
    )
    assert idle(client) == 3


async def test_a_client_gateway_without_the_dialed_name_is_refused_by_the_dialer(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki)
    server = await start_server(
        nursery, pki, sim, client.dial_in_addresses[0], tmp_path, name="bench.elsewhere.test"
    )
    await eventually(
        lambda: (
            metric(server.metrics, "usbip_gateway_reverse_dials_total", result="handshake_failed")
            >= 1
        ),
        "the dial refused",
    )
    assert metric(
        server.metrics, "usbip_gateway_tls_handshake_failures_total", reason="hostname_mismatch"
    )
    assert idle(client) == idle(server) == 0


async def test_several_device_hosts_each_on_their_own_port(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    other = "device-b.test"
    cert, key = write_leaf(pki.ca.issue_cert(other), tmp_path, "device-b")
    client = await start_client(nursery, pki, names=(SERVER_NAME, other))
    sims: dict[str, SimServer] = {}
    for name, tls in ((SERVER_NAME, None), (other, TLSSettings(cert, key, pki.ca_pem))):
        sims[name] = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
        home = tmp_path / name
        home.mkdir()
        await start_server(nursery, pki, sims[name], client.dial_in_addresses[0], home, tls=tls)
    await eventually(lambda: idle(client) == 4, "both device hosts dialed in")
    for name in (SERVER_NAME, other, other):
        await list_devices(await connect(client.reverse_addresses[name]))
    # Each port reached its own device host's usbipd, and only that one.
    assert sims[SERVER_NAME].connections_accepted == 1
    assert sims[other].connections_accepted == 2


async def test_compression_is_negotiated_on_dialed_connections(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    zstd = CompressionSettings(algorithm="zstd")
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = await start_client(nursery, pki, compression=zstd)
    server = await start_server(
        nursery, pki, sim, client.dial_in_addresses[0], tmp_path, compression=zstd
    )
    await eventually(lambda: idle(client) == 2, "pool ready")
    device = await import_device(await connect(client.reverse_addresses[SERVER_NAME]), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        payload = bytes(200_000)  # compresses well
        assert (await device.submit(1, Direction.OUT, data=payload)).status == 0
        assert (await device.submit(1, Direction.IN, length=len(payload))).data == payload
        (session,) = server.sessions.values()
        assert session.compression == "zstd"
        await device.aclose()


async def test_shutdown_stops_dialing_and_closes_the_idle_connections(
    reverse: Reverse,
) -> None:
    assert await reverse.server.shutdown(1)
    await eventually(lambda: idle(reverse.client) == 0, "the client gateway saw them close")
    assert idle(reverse.server) == 0
    with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError)):
        await list_devices(await connect(reverse.local))


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(0.25, 2.0)
    waits = [backoff.next() for _ in range(6)]
    for wait, ceiling in zip(waits, [0.25, 0.5, 1.0, 2.0, 2.0, 2.0], strict=True):
        assert ceiling / 2 <= wait <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.25


async def _agent_client(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery, settings: AgentSettings
) -> tuple[ClientGateway, list[object]]:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    config = client_config(
        pki,
        UNUSED,
        agent=settings,
        reverse=ReverseAcceptSettings(
            listen=Address(LOOPBACK, 0), servers=((SERVER_NAME, Address(LOOPBACK, 0)),)
        ),
    )
    client = ClientGateway(replace(config, listen=()))
    listeners = await nursery.start(client.serve)
    await start_server(nursery, pki, sim, client.dial_in_addresses[0], tmp_path)
    return client, listeners


async def test_the_agent_attaches_from_a_server_that_dials_in(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    vhci = FakeVhci(tmp_path / "client-sys", nursery)
    settings = AgentSettings(
        enabled=True,
        interval=0.2,
        select=('allow busid "1-2"',),
        vhci=vhci.platform,
        state_dir=vhci.state_dir,
    )
    client, _ = await _agent_client(pki, tmp_path, nursery, settings)
    local = client.reverse_addresses[SERVER_NAME]
    agent = Agent(settings, client, local, runner=vhci, reverse_server=SERVER_NAME)
    await nursery.start(agent.run)
    await eventually(lambda: "1-2" in vhci.attached(), "the agent attached 1-2")
    assert vhci.calls[0] == [
        *("usbip", "--tcp-port", str(local.port)),
        *("attach", "-r", LOOPBACK, "-b", "1-2"),
    ]
    assert (agent.status()["server"], agent.status()["dialer"]) == (SERVER_NAME, "server")


async def test_the_client_gateway_runs_an_agent_per_server_that_dials_in(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    settings = AgentSettings(enabled=True, interval=0.2, select=("reject",))
    client, listeners = await _agent_client(pki, tmp_path, nursery, settings)
    await nursery.start(partial(run_companions, client, listeners))
    section = client.metrics.status_sections[f"agent {SERVER_NAME}"]
    await eventually(lambda: section()["link"] == "up", "the agent listed the server")
    assert section()["dialer"] == "server"
