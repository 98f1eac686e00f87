"""CRL support: `certs revoke`, a reload, and a revoked client refused at the handshake."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest
import trio

from gateway.cli import reload
from gateway.config import Address, ClientConfig, TLSSettings
from gateway.demo import start_stack
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.reloading import watch_tls
from gateway.pki.cli import add_certs_parser
from gateway.protocol import Direction
from gateway.transport.names import local_address
from gateway.transport.tls import ReloadableContext
from gateway.usbip.importer import import_device, list_devices


def certs(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_certs_parser(parser.add_subparsers())
    args = parser.parse_args(["certs", *argv])
    result: int = args.func(args)
    return result


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    assert certs("init", "--dir", str(d)) == 0
    assert certs("issue", "--dir", str(d), "--kind", "server", "--name", "server",
                 "--dns", "localhost") == 0  # fmt: skip
    for name in ("alice", "bob"):
        assert certs("issue", "--dir", str(d), "--kind", "client", "--name", name) == 0
    assert certs("crl", "--dir", str(d)) == 0  # an empty CRL to start with
    return d


def tls(d: Path, name: str, crl: bool = False) -> TLSSettings:
    return TLSSettings(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem",
                       crl=d / "crl.pem" if crl else None)  # fmt: skip


async def _client(nursery: trio.Nursery, d: Path, name: str, server: Address) -> Address:
    gateway = ClientGateway(
        ClientConfig(
            tls=tls(d, name),
            server=server,
            server_name="localhost",
            listen=(Address("127.0.0.1", 0),),
        )
    )
    listeners = await nursery.start(gateway.serve)
    return local_address(listeners[0])


async def _list(address: Address) -> int:
    return len(await list_devices(await trio.open_tcp_stream(address.host, address.port)))


async def test_a_revoked_client_is_refused_after_reload_and_others_carry_on(
    pki: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(nursery, tls(pki, "server", crl=True), tls(pki, "alice"))
    bob = await _client(nursery, pki, "bob", stack.server_address)
    assert await _list(bob) == 3  # not revoked yet

    alice = stack.client_address
    device = await import_device(await trio.open_tcp_stream(alice.host, alice.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        assert certs("revoke", "--dir", str(pki), str(pki / "bob.pem")) == 0
        reload(stack.server)  # what SIGHUP does
        assert stack.server.tls.generation == 2

        with (
            caplog.at_level(logging.WARNING, "gateway.edges.server_gateway"),
            pytest.raises(Exception),  # noqa: B017, PT011
        ):
            await _list(bob)
        assert "certificate_revoked" in caplog.text
        # Alice's open session was not touched, and she can still connect anew.
        assert (await device.submit(1, Direction.OUT, data=b"after reload")).status == 0
        assert await _list(alice) == 2  # 1-2 is in use by her own session
        await device.aclose()
    exposition = stack.server.metrics.exposition().decode()
    assert 'reason="certificate_revoked"' in exposition


async def test_a_broken_crl_on_reload_keeps_the_old_context(
    pki: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(nursery, tls(pki, "server", crl=True), tls(pki, "alice"))
    (pki / "crl.pem").write_text("not a CRL\n")
    with caplog.at_level(logging.ERROR, "gateway"):
        reload(stack.server)
    assert "TLS reload failed, keeping the previous certificates" in caplog.text
    assert stack.server.tls.generation == 1
    assert await _list(stack.client_address) == 3


def test_revoking_a_certificate_from_another_ca_is_refused(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    assert certs("init", "--dir", str(other)) == 0
    assert certs("issue", "--dir", str(other), "--kind", "client", "--name", "x") == 0
    assert certs("revoke", "--dir", str(pki), str(other / "x.pem")) == 2
    assert "was not issued by the CA" in capsys.readouterr().err


async def test_renewed_certificates_are_loaded_without_a_signal(
    pki: Path, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls(pki, "server", crl=True)
    context = ReloadableContext.server(settings.cert, settings.key, settings.ca, crl=settings.crl)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_tls, context, settings)
        await trio.sleep(3 * settings.watch_interval)
        assert context.generation == 1  # nothing changed
        assert certs("issue", "--dir", str(pki), "--kind", "server", "--name", "server",
                     "--dns", "localhost", "--force") == 0  # fmt: skip
        await trio.sleep(2 * settings.watch_interval)
        assert context.generation == 2  # renewed, picked up
        with caplog.at_level(logging.ERROR, "gateway.reload"):
            (pki / "crl.pem").write_text("garbage\n")
            await trio.sleep(4 * settings.watch_interval)
        assert context.generation == 2  # a broken file keeps the old context...
        assert caplog.text.count("TLS reload failed") == 1  # ...and is reported once
        nursery.cancel_scope.cancel()


async def test_a_client_gateway_closes_sessions_through_a_revoked_server_certificate(
    pki: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(nursery, tls(pki, "server"), tls(pki, "alice", crl=True))
    alice = stack.client_address
    device = await import_device(await trio.open_tcp_stream(alice.host, alice.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        assert (await device.submit(1, Direction.OUT, data=b"before")).status == 0
        assert certs("revoke", "--dir", str(pki), str(pki / "server.pem")) == 0
        with caplog.at_level(logging.WARNING, "gateway.edges.client_gateway"):
            reload(stack.client)
            with trio.fail_after(10):
                await device.closed.wait()
        await device.aclose()
    assert re.search(
        r"closing session \d+: server certificate revoked \(serial [0-9a-f]+ in", caplog.text
    )
    # New connections are refused too: the server's certificate fails the client's check.
    with pytest.raises(Exception):  # noqa: B017, PT011
        await _list(alice)


async def test_revoked_client_sessions_left_open_when_revoke_on_reload_is_off(
    pki: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(nursery, tls(pki, "server", crl=True), tls(pki, "alice"))
    stack.server.config = dataclasses.replace(
        stack.server.config,
        policy=dataclasses.replace(stack.server.config.policy, revoke_on_reload=False),
    )
    alice = stack.client_address
    device = await import_device(await trio.open_tcp_stream(alice.host, alice.port), "1-2")
    async with trio.open_nursery() as inner:
        inner.start_soon(device.serve)
        assert certs("revoke", "--dir", str(pki), str(pki / "alice.pem")) == 0
        with caplog.at_level(logging.WARNING, "gateway.edges.server_gateway"):
            reload(stack.server)
        assert "now denied, left open (revoke_on_reload off): client certificate revoked" in (
            caplog.text
        )
        assert (await device.submit(1, Direction.OUT, data=b"still here")).status == 0
        await device.aclose()
