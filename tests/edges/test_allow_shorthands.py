"""--allow-cn, --allow-uri and --allow-dns: the policy a one-line rule file would give,
from the flags to the devices a client sees."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.cli import _overrides, build_parser, main
from gateway.config import Address, ServerConfig, load
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.policy import ClientFacts, DeviceFacts, Policy
from gateway.policy.shorthand import shorthand_rules
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.usbip.importer import list_devices

from ..pkitools import PKI, client_config, issue_client


def _server_config(pki: PKI, upstream: Address, *flags: str) -> ServerConfig:
    argv = [
        "server", "--listen", "127.0.0.1:0", "--upstream", str(upstream),
        "--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca_pem),
        *flags,
    ]  # fmt: skip
    config = load("server", None, _overrides("server", build_parser().parse_args(argv)))
    assert isinstance(config, ServerConfig)
    # The simulator's devices are not in this host's sysfs.
    return replace(config, policy=replace(config.policy, sysfs=None))


async def _listed(pki: PKI, nursery: trio.Nursery, *flags: str, client: ClientGateway) -> int:
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    server = ServerGateway(_server_config(pki, Address(*sim.addresses[0]), *flags), strings=sim)
    server_address = local_address((await nursery.start(server.serve))[0])
    gateway = ClientGateway(replace(client.config, server=server_address))
    local = local_address((await nursery.start(gateway.serve))[0])
    with trio.fail_after(20):
        return len(await list_devices(await trio.open_tcp_stream(local.host, local.port)))


async def test_allow_cn_lets_that_client_in_and_no_other(pki: PKI, nursery: trio.Nursery) -> None:
    client = ClientGateway(client_config(pki, Address("127.0.0.1", 1)))  # CN=test-client
    assert await _listed(pki, nursery, "--allow-cn", "test-client", client=client) == 3
    # Anyone else: rejected, so nothing is listed (the implicit `default reject`).
    others = ("--allow-cn", "alice", "--allow-cn", "bob")
    assert await _listed(pki, nursery, *others, client=client) == 0


async def test_allow_uri_matches_a_san_uri(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> None:
    spiffe = "spiffe://example.org/ns/lab/sa/bob"
    tls = issue_client(pki, tmp_path, "bob", uris=(spiffe,))
    client = ClientGateway(replace(client_config(pki, Address("127.0.0.1", 1)), tls=tls))
    assert await _listed(pki, nursery, "--allow-uri", spiffe, client=client) == 3
    assert await _listed(pki, nursery, "--allow-dns", "bob.example.org", client=client) == 0


def test_the_shorthands_are_the_one_line_rule_file() -> None:
    assert shorthand_rules(["alice", "bob"], [], []) == (
        'allow client-cn one-of { "alice" "bob" }\n'
    )
    assert shorthand_rules([], [], ["gw.example.org"]) == 'allow client-dns "gw.example.org"\n'
    # Values are exact: a `*` in one is a character, not a wildcard.
    policy = Policy.parse(shorthand_rules([], ["spiffe://x/*"], []))
    device = DeviceFacts(busid="1-1", vendor_id=0x0525, product_id=0xA4A0)
    assert policy.decide(ClientFacts(None, ("spiffe://x/*",)), device).allowed
    assert not policy.decide(ClientFacts(None, ("spiffe://x/y",)), device).allowed
    assert not policy.decide(ClientFacts("alice"), device).allowed


def test_a_file_and_the_shorthands_together_are_refused(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "p.rules"
    rules.write_text("allow\n")
    tls = ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca_pem)]
    argv = ["server", "--listen", "127.0.0.1:0", "--policy", str(rules), "--allow-cn", "a"]
    assert main([*argv, *tls]) == 2
    assert "policy.file: give a policy file or --allow-cn/--allow-uri/--allow-dns, not both" in (
        capsys.readouterr().err
    )
