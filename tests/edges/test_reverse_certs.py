"""Reverse mode with certificates from `usbip-gateway certs`: `--kind both` works for the
roles each gateway plays in it; a certificate for one TLS role only is refused."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.cli import main
from gateway.config import (
    Address,
    ClientConfig,
    PolicySettings,
    ReverseAcceptSettings,
    ReverseDialSettings,
    ServerConfig,
    TLSSettings,
)
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.sim.server import SimServer, serve_sim
from gateway.usbip.importer import list_devices

from .test_reverse import LOOPBACK, UNUSED, connect, eventually, idle, metric


def _issue(directory: Path, name: str, kind: str) -> TLSSettings:
    assert (
        main(
            [
                *("certs", "issue", "--dir", str(directory), "--kind", kind, "--name", name),
                *("--dns", f"{name}.example"),
            ]
        )
        == 0
    )
    return TLSSettings(directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem")


async def _pair(
    nursery: trio.Nursery, device: TLSSettings, bench: TLSSettings
) -> tuple[ServerGateway, ClientGateway]:
    sim: SimServer = await nursery.start(partial(serve_sim, None, host=LOOPBACK, port=0))
    client = ClientGateway(
        ClientConfig(
            tls=bench,
            server=UNUSED,
            server_name="unused",
            listen=(),
            reverse=ReverseAcceptSettings(
                listen=Address(LOOPBACK, 0),
                servers=(("device.example", Address(LOOPBACK, 0)),),
            ),
        )
    )
    await nursery.start(client.serve)
    server = ServerGateway(
        ServerConfig(
            tls=device,
            upstream=Address(*sim.addresses[0]),
            policy=PolicySettings(sysfs=None),
            reverse=ReverseDialSettings(
                dial=(client.dial_in_addresses[0],), name="bench.example", backoff_max=0.2
            ),
        ),
        strings=sim,
    )
    await nursery.start(server.serve)
    return server, client


async def test_kind_both_certificates_serve_both_directions(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 0
    device = _issue(tmp_path, "device", "both")
    bench = _issue(tmp_path, "bench", "both")
    _server, client = await _pair(nursery, device, bench)
    await eventually(lambda: idle(client) == 2, "dialed in")
    listed = await list_devices(await connect(client.reverse_addresses["device.example"]))
    assert len(listed) == 3


@pytest.mark.parametrize(
    ("device_kind", "bench_kind", "refused_by"),
    [
        ("server", "both", "client"),  # the dialing side has no clientAuth
        ("both", "client", "server"),  # the accepting side has no serverAuth
    ],
)
async def test_a_single_role_certificate_cannot_play_the_other_tls_role(
    tmp_path: Path, nursery: trio.Nursery, device_kind: str, bench_kind: str, refused_by: str
) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 0
    device = _issue(tmp_path, "device", device_kind)
    bench = _issue(tmp_path, "bench", bench_kind)
    server, client = await _pair(nursery, device, bench)
    refuser = client if refused_by == "client" else server
    await eventually(
        lambda: (
            metric(
                refuser.metrics,
                "usbip_gateway_tls_handshake_failures_total",
                reason="bad_certificate",  # unsupported certificate purpose
            )
            >= 1
        ),
        "the handshake refused",
    )
    assert idle(client) == 0
    # Either way the dialing side counts the refusal as a failed handshake.
    await eventually(
        lambda: (
            metric(server.metrics, "usbip_gateway_reverse_dials_total", result="handshake_failed")
            >= 1
        ),
        "the dialer counted it",
    )
