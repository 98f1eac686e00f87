"""Client certificates that chain to the CA yet are no client identity, through the real
server gateway over TLS: refused after the handshake, before usbipd hears of anything,
with an audit record, a metric and a log line; never a traceback. And an identity is
peer-chosen text: in a text log it cannot start a line of its own."""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509

from gateway.config import Address, AuditSettings, TLSSettings
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.logs import TextFormatter
from gateway.protocol import OpReplyDevlist, OpStatus
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address

from ..badcerts import der, issue, san, subject_string
from ..pkitools import PKI, client_config, server_config
from .tls_client import OP_REQ_DEVLIST, exchange


@dataclass
class Gateway:
    sim: SimServer
    server: ServerGateway
    address: Address
    audit: Path

    async def records(self) -> list[dict[str, object]]:
        await self.server.wait_idle()
        self.server.audit.close()
        await self.server.audit.finished.wait()
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.server.metrics.registry.get_sample_value(f"usbip_gateway_{name}", labels)


@pytest.fixture
async def gateway(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> Gateway:
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    audit = tmp_path / "audit.jsonl"
    config = replace(
        server_config(pki, Address(*sim.addresses[0])), audit=AuditSettings(path=str(audit))
    )
    server = ServerGateway(config, strings=sim)
    listeners = await nursery.start(server.serve)
    return Gateway(sim, server, local_address(listeners[0]), audit)


async def devlist_over_tls(gateway: Gateway, tls: TLSSettings) -> bytes:
    return await exchange(gateway.address, tls, OP_REQ_DEVLIST)


async def assert_refused(
    gateway: Gateway, tls: TLSSettings, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        assert await devlist_over_tls(gateway, tls) == b""
        records = await gateway.records()
    assert gateway.sim.connections_accepted == 0  # usbipd never heard of it
    refused = [r for r in records if r["event"] == "identity_refused"]
    assert len(refused) == 1
    assert refused[0]["reason"] == reason
    assert isinstance(refused[0]["fingerprint_sha256"], str)
    assert len(refused[0]["fingerprint_sha256"]) == 64
    assert not [r for r in records if r["event"] == "session_end"]
    assert gateway.metric("identity_refusals_total", role="server", reason=reason) == 1
    lines = [r for r in caplog.records if "refused the client certificate" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert reason in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_an_intermediate_ca_certificate_is_not_a_client(
    gateway: Gateway, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child = pki.ca.create_child_ca()
    cert, key = tmp_path / "child-ca.pem", tmp_path / "child-ca.key"
    child.cert_pem.write_to_path(str(cert))
    child.private_key_pem.write_to_path(str(key))
    await assert_refused(gateway, TLSSettings(cert, key, pki.ca_pem), "ca_certificate", caplog)


async def test_a_key_cert_sign_certificate_is_not_a_client(
    gateway: Gateway, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,  # without CA:TRUE: signs certificates all the same
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    tls = issue(pki, tmp_path, "signer", extensions=(usage,))
    await assert_refused(gateway, tls, "ca_certificate", caplog)


UNDECODABLE = {
    # A SAN URI or DNS name is an IA5String: bytes above 0x7f are not one.
    "san_uri_not_ascii": {"extensions": (san(der(0x86, b"spiffe://\xff\xfe/x")),)},
    "san_dns_not_ascii": {"extensions": (san(der(0x82, b"a\xff.test")),)},
    # x400Address: a GeneralName the parser has no type for.
    "san_x400_address": {"extensions": (san(der(0xA3, der(0x30, b""))),)},
    # A TeletexString CN whose bytes are not UTF-8.
    "subject_teletex_bytes": {"patch": subject_string(0x14, b"\xff\xfe\xfd\xfc")},
    # An IA5String CN with bytes above 0x7f.
    "subject_ia5_not_ascii": {"patch": subject_string(0x16, b"\xff\xfeAA")},
    # A CN whose value is a SEQUENCE, not a string at all.
    "subject_not_a_string": {"patch": subject_string(0x30, b"\x05\x00\x05\x00")},
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
async def test_a_certificate_the_identity_parser_cannot_decode_is_refused(
    case: str, gateway: Gateway, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = issue(pki, tmp_path, case, **UNDECODABLE[case])  # type: ignore[arg-type]
    await assert_refused(gateway, tls, "undecodable", caplog)


async def test_an_ordinary_client_certificate_is_served(
    gateway: Gateway, pki: PKI, tmp_path: Path
) -> None:
    # The control for the refusals above: same builder, same path, a plain leaf.
    tls = issue(pki, tmp_path, "plain", common_name="plain")
    assert (await devlist_over_tls(gateway, tls))[:4] == b"\x01\x11\x00\x05"
    assert gateway.sim.connections_accepted == 1
    records = await gateway.records()
    assert not [r for r in records if r["event"] == "identity_refused"]


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ gateway[.\w]*: ")
FORGED = "INFO gateway.edges: peer=CN=root"  # what a record looks like (CN: 64 chars max)


@pytest.mark.parametrize(
    "common_name",
    [
        f"m\n2026-11-25 09:00:00,000 {FORGED}",  # a whole forged line, with spaces
        "m\noutcome=attached",  # no space: nothing prompted quoting before
    ],
)
async def test_a_newline_in_an_identity_cannot_forge_a_log_line(
    common_name: str, gateway: Gateway, pki: PKI, tmp_path: Path
) -> None:
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        tls = issue(pki, tmp_path, "mallory", common_name=common_name)
        assert (await devlist_over_tls(gateway, tls))[:4] == b"\x01\x11\x00\x05"
        await gateway.server.wait_idle()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = text.getvalue().splitlines()
    about_peer = [line for line in lines if "CN=m\\n" in line]
    assert len(about_peer) >= 2  # the session's start (debug) and its end
    assert all(RECORD_START.match(line) for line in lines), lines
    escaped = common_name.replace("\n", "\\n")
    end = next(line for line in lines if " session end " in line)
    assert f'peer="CN={escaped}"' in end
    assert all(escaped in line for line in about_peer)


async def test_the_client_gateway_refuses_a_server_certificate_it_cannot_decode(
    pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    # OpenSSL checks the chain and the name (SAN DNS localhost); the subject is a
    # TeletexString of bytes that are not text, which only the identity parser reads.
    names = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    server_tls = issue(
        pki, tmp_path, "odd-server", extensions=(names,), patch=subject_string(0x14, b"\xff" * 4)
    )
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    server = ServerGateway(
        replace(server_config(pki, Address(*sim.addresses[0])), tls=server_tls), strings=sim
    )
    server_address = local_address((await nursery.start(server.serve))[0])
    client = ClientGateway(client_config(pki, server_address))
    local = local_address((await nursery.start(client.serve))[0])
    stream = await trio.open_tcp_stream(local.host, local.port)
    with trio.fail_after(10):
        await stream.send_all(OP_REQ_DEVLIST)
        answer = await stream.receive_some(65536)
        # A failed reply (usbip reports a failure), nothing of the server relayed.
        assert answer == OpReplyDevlist(status=OpStatus.ERROR).encode()
        await client.acceptor.wait_idle()
    await stream.aclose()
    assert (
        client.metrics.registry.get_sample_value(
            "usbip_gateway_identity_refusals_total", {"role": "client", "reason": "undecodable"}
        )
        == 1
    )
    assert client.acceptor.internal_errors == 0
