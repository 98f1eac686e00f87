"""Mutual TLS on `TlsStream` over socket pairs, and once over loopback TCP."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from gateway.pki import ca as certificates
from gateway.transport.identity import PeerIdentity
from gateway.transport.tls import (
    ALPN_PLAIN,
    ALPN_ZSTD,
    HANDSHAKE_REASONS,
    HandshakeFailed,
    ReloadableContext,
    TLSConfigError,
    client_context,
    failure_reason,
    handshake,
    negotiated_alpn,
    peer_identity,
    server_context,
)
from gateway.transport.tls_stream import TlsStream

SPIFFE = "spiffe://example.org/ns/x/sa/y"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    server: Pair
    client: Pair


def _write_trustme(leaf: trustme.LeafCert, directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    leaf.cert_chain_pems[0].write_to_path(str(pair.cert))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def _write_own(issued: certificates.Issued, directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    certificates.write_issued(issued, pair.cert, pair.key, force=True)
    return pair


@pytest.fixture
def trustme_pki(tmp_path: Path) -> PKI:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = _write_trustme(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "server")
    client = _write_trustme(ca.issue_cert("alice.example", common_name="alice"), tmp_path, "client")
    return PKI(tmp_path / "ca.pem", server, client)


@pytest.fixture
def own_ca(tmp_path: Path) -> certificates.Issued:
    ca = certificates.create_ca("test CA")
    certificates.write_issued(ca, tmp_path / "own-ca.pem", tmp_path / "own-ca.key")
    return ca


@pytest.fixture
def own_pki(tmp_path: Path) -> PKI:
    demo = certificates.make_demo_pki(tmp_path / "demo")
    return PKI(
        demo.ca_cert,
        Pair(demo.server_cert, demo.server_key),
        Pair(demo.client_cert, demo.client_key),
    )


def _server_ctx(pki: PKI, **kw: Any) -> ssl.SSLContext:
    return server_context(pki.server.cert, pki.server.key, pki.ca, **kw)


def _client_ctx(pki: PKI, client: Pair | None = None, **kw: Any) -> ssl.SSLContext:
    client = client or pki.client
    return client_context(client.cert, client.key, pki.ca, **kw)


def _bare_client_ctx(ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    return ctx


@dataclass
class Outcome:
    """What one side saw: an identity on success, else the reason it failed and where."""

    identity: PeerIdentity | None = None
    alpn: str | None = None
    reason: str | None = None
    during_handshake: bool = False
    received: bytes = b""


async def _exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    hostname: str = "localhost",
) -> tuple[Outcome, Outcome]:
    """Handshake both ends; the server then speaks first, so a client rejected late under
    TLS 1.3 finds out on its first read."""
    a, b = socket.socketpair()
    server_stream = TlsStream(a, server_ctx, server_side=True)
    client_stream = TlsStream(b, client_ctx, server_hostname=hostname)
    server, client = Outcome(), Outcome()

    async def run_server() -> None:
        try:
            await handshake(server_stream, TIMEOUT)
        except HandshakeFailed as exc:
            server.reason, server.during_handshake = exc.reason, True
            await trio.aclose_forcefully(server_stream)
            return
        server.identity = peer_identity(server_stream)
        server.alpn = negotiated_alpn(server_stream)
        await server_stream.send_all(b"hello")
        await server_stream.aclose()

    async def run_client() -> None:
        try:
            await handshake(client_stream, TIMEOUT)
        except HandshakeFailed as exc:
            client.reason, client.during_handshake = exc.reason, True
            await trio.aclose_forcefully(client_stream)
            return
        client.identity = peer_identity(client_stream)
        client.alpn = negotiated_alpn(client_stream)
        try:
            client.received = bytes(await client_stream.receive_some())
        except trio.BrokenResourceError as exc:
            client.reason = failure_reason(exc)
        await trio.aclose_forcefully(client_stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        nursery.start_soon(run_client)
    return server, client


# --- success -------------------------------------------------------------------------------


async def test_mutual_handshake_with_trustme(trustme_pki: PKI) -> None:
    server, client = await _exchange(_server_ctx(trustme_pki), _client_ctx(trustme_pki))
    assert client.received == b"hello"
    assert server.identity is not None
    assert server.identity.common_name == "alice"
    assert server.identity.dns_names == ("alice.example",)
    assert server.identity.uris == ()
    assert str(server.identity) == "CN=alice"
    assert client.identity is not None
    assert client.identity.dns_names == ("localhost",)
    assert server.alpn == client.alpn == ALPN_PLAIN


async def test_identity_from_own_tooling_has_full_spiffe_uri(
    tmp_path: Path, own_ca: certificates.Issued
) -> None:
    server = _write_own(
        certificates.issue_server_cert(own_ca, dns_names=["localhost"]), tmp_path, "s"
    )
    client = _write_own(
        certificates.issue_client_cert(
            own_ca, common_name="svc-y", uris=[SPIFFE], dns_names=["y.example.org"]
        ),
        tmp_path,
        "c",
    )
    pki = PKI(tmp_path / "own-ca.pem", server, client)
    server_seen, client_seen = await _exchange(_server_ctx(pki), _client_ctx(pki))
    ident = server_seen.identity
    assert ident is not None
    assert ident.common_name == "svc-y"
    assert ident.uris == (SPIFFE,)
    assert ident.dns_names == ("y.example.org",)
    assert str(ident) == SPIFFE
    expected = certificates.load_certificate(client.cert)
    assert ident.fingerprint_sha256 == certificates.fingerprint_sha256(expected)
    assert ident.serial == expected.serial_number
    as_json = json.loads(json.dumps(ident.as_dict()))
    assert as_json["uris"] == [SPIFFE]
    assert int(as_json["serial"], 16) == expected.serial_number
    assert client_seen.received == b"hello"


def test_identity_str_falls_back_to_fingerprint() -> None:
    ident = PeerIdentity(None, (), (), "ab" * 32, 1)
    assert str(ident) == "sha256:" + "ab" * 8


async def test_demo_pki_handshakes_by_ip(own_pki: PKI) -> None:
    for host in ("localhost", "127.0.0.1", "::1"):
        server, client = await _exchange(_server_ctx(own_pki), _client_ctx(own_pki), host)
        assert server.identity is not None
        assert server.identity.uris == (certificates.DEMO_CLIENT_URI,)
        assert server.identity.common_name == certificates.DEMO_CLIENT_CN
        assert client.received == b"hello"


@pytest.mark.parametrize(
    ("server_alpn", "client_alpn", "expected"),
    [
        ((ALPN_ZSTD, ALPN_PLAIN), (ALPN_ZSTD, ALPN_PLAIN), ALPN_ZSTD),
        ((ALPN_ZSTD, ALPN_PLAIN), (ALPN_PLAIN,), ALPN_PLAIN),
        ((ALPN_PLAIN,), (ALPN_ZSTD, ALPN_PLAIN), ALPN_PLAIN),
        ((ALPN_PLAIN,), (ALPN_ZSTD,), None),
    ],
)
async def test_alpn_negotiation(
    trustme_pki: PKI,
    server_alpn: tuple[str, ...],
    client_alpn: tuple[str, ...],
    expected: str | None,
) -> None:
    server, client = await _exchange(
        _server_ctx(trustme_pki, alpn=server_alpn), _client_ctx(trustme_pki, alpn=client_alpn)
    )
    assert server.alpn == client.alpn == expected


async def test_tls12_allowed_when_configured(trustme_pki: PKI) -> None:
    v12 = ssl.TLSVersion.TLSv1_2
    client_ctx = _client_ctx(trustme_pki, min_version=v12)
    client_ctx.maximum_version = v12
    server, client = await _exchange(_server_ctx(trustme_pki, min_version=v12), client_ctx)
    assert server.identity is not None
    assert client.received == b"hello"


def test_min_version_below_tls12_rejected(trustme_pki: PKI) -> None:
    with pytest.raises(ValueError, match="TLSv1_2 or TLSv1_3"):
        _server_ctx(trustme_pki, min_version=ssl.TLSVersion.TLSv1_1)


# --- refusals ------------------------------------------------------------------------------


async def test_client_without_certificate_tls13(trustme_pki: PKI) -> None:
    server, client = await _exchange(_server_ctx(trustme_pki), _bare_client_ctx(trustme_pki.ca))
    assert (server.reason, server.during_handshake) == ("no_certificate", True)
    # TLS 1.3: the client's handshake completes before the server checks its certificate;
    # the refusal (a certificate_required alert) arrives on the client's first read.
    assert (client.reason, client.during_handshake) == ("no_certificate", False)


async def test_client_without_certificate_tls12(trustme_pki: PKI) -> None:
    v12 = ssl.TLSVersion.TLSv1_2
    client_ctx = _bare_client_ctx(trustme_pki.ca)
    client_ctx.maximum_version = v12
    server, client = await _exchange(_server_ctx(trustme_pki, min_version=v12), client_ctx)
    assert (server.reason, server.during_handshake) == ("no_certificate", True)
    # TLS 1.2 has no certificate_required alert; the client only hears handshake_failure.
    assert (client.reason, client.during_handshake) == ("other", True)


async def test_client_cert_from_another_ca(tmp_path: Path, trustme_pki: PKI) -> None:
    other = trustme.CA()
    stranger = _write_trustme(other.issue_cert("mallory.example"), tmp_path, "stranger")
    server, client = await _exchange(
        _server_ctx(trustme_pki), _client_ctx(trustme_pki, client=stranger)
    )
    assert (server.reason, server.during_handshake) == ("unknown_ca", True)
    assert (client.reason, client.during_handshake) == ("unknown_ca", False)


async def test_server_cert_from_another_ca(tmp_path: Path, trustme_pki: PKI) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    client_ctx = client_context(
        trustme_pki.client.cert, trustme_pki.client.key, tmp_path / "other-ca.pem"
    )
    server, client = await _exchange(_server_ctx(trustme_pki), client_ctx)
    assert (client.reason, client.during_handshake) == ("unknown_ca", True)
    assert (server.reason, server.during_handshake) == ("unknown_ca", True)


async def test_wrong_server_hostname(trustme_pki: PKI) -> None:
    server, client = await _exchange(
        _server_ctx(trustme_pki), _client_ctx(trustme_pki), hostname="gateway.example"
    )
    assert (client.reason, client.during_handshake) == ("hostname_mismatch", True)
    assert (server.reason, server.during_handshake) == ("bad_certificate", True)


async def test_expired_client_certificate(
    tmp_path: Path, trustme_pki: PKI, own_ca: certificates.Issued
) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = certificates.issue_client_cert(own_ca, common_name="old", days=1, not_before=long_ago)
    client = _write_own(expired, tmp_path, "expired")
    server_ctx = server_context(
        trustme_pki.server.cert, trustme_pki.server.key, tmp_path / "own-ca.pem"
    )
    server, client_seen = await _exchange(server_ctx, _client_ctx(trustme_pki, client=client))
    assert (server.reason, server.during_handshake) == ("certificate_expired", True)
    assert client_seen.reason == "certificate_expired"


async def test_expired_server_certificate(tmp_path: Path, trustme_pki: PKI) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca2.pem"))
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert(
        "localhost", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    expired = _write_trustme(leaf, tmp_path, "expired-server")
    server_ctx = server_context(expired.cert, expired.key, trustme_pki.ca)
    client_ctx = client_context(
        trustme_pki.client.cert, trustme_pki.client.key, tmp_path / "ca2.pem"
    )
    server, client = await _exchange(server_ctx, client_ctx)
    assert (client.reason, client.during_handshake) == ("certificate_expired", True)
    assert server.reason == "certificate_expired"


async def test_server_certificate_used_as_client_certificate(
    tmp_path: Path, own_ca: certificates.Issued, trustme_pki: PKI
) -> None:
    # EKU serverAuth only: OpenSSL checks the purpose, so it cannot authenticate a client.
    wrong = certificates.issue_server_cert(own_ca, dns_names=["impostor.example"])
    client = _write_own(wrong, tmp_path, "wrong-eku")
    server_ctx = server_context(
        trustme_pki.server.cert, trustme_pki.server.key, tmp_path / "own-ca.pem"
    )
    server, client_seen = await _exchange(server_ctx, _client_ctx(trustme_pki, client=client))
    assert (server.reason, server.during_handshake) == ("bad_certificate", True)
    assert client_seen.reason == "bad_certificate"


async def test_tls12_only_client_refused_by_tls13_server(trustme_pki: PKI) -> None:
    client_ctx = _client_ctx(trustme_pki, min_version=ssl.TLSVersion.TLSv1_2)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = await _exchange(_server_ctx(trustme_pki), client_ctx)
    assert (server.reason, server.during_handshake) == ("protocol_version", True)
    assert (client.reason, client.during_handshake) == ("protocol_version", True)


async def test_plain_usbip_to_tls_port(trustme_pki: PKI) -> None:
    a, b = socket.socketpair()
    server_stream = TlsStream(a, _server_ctx(trustme_pki), server_side=True)
    b.sendall(bytes.fromhex("0111800500000000"))  # OP_REQ_DEVLIST
    with pytest.raises(HandshakeFailed) as info:
        await handshake(server_stream, TIMEOUT)
    assert info.value.reason == "not_tls"
    await server_stream.aclose()
    b.close()


async def test_peer_closes_during_handshake(trustme_pki: PKI) -> None:
    a, b = socket.socketpair()
    server_stream = TlsStream(a, _server_ctx(trustme_pki), server_side=True)
    b.close()
    with pytest.raises(HandshakeFailed) as info:
        await handshake(server_stream, TIMEOUT)
    assert info.value.reason == "eof"
    await server_stream.aclose()


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock, trustme_pki: PKI) -> None:
    a, silent_peer = socket.socketpair()
    server_stream = TlsStream(a, _server_ctx(trustme_pki), server_side=True)
    start = trio.current_time()
    with pytest.raises(HandshakeFailed) as info:
        await handshake(server_stream, 30.0)
    assert info.value.reason == "timeout"
    assert trio.current_time() - start == pytest.approx(30.0)
    await server_stream.aclose()
    silent_peer.close()


def test_reasons_are_bounded() -> None:
    assert len(set(HANDSHAKE_REASONS)) == len(HANDSHAKE_REASONS)
    assert all(r.isidentifier() and r.islower() for r in HANDSHAKE_REASONS)
    assert failure_reason(trio.TooSlowError()) == "timeout"
    assert failure_reason(RuntimeError("x")) == "other"


# --- reload --------------------------------------------------------------------------------


async def test_reload_swaps_for_new_connections_only(tmp_path: Path, trustme_pki: PKI) -> None:
    holder = ReloadableContext.server(
        trustme_pki.server.cert, trustme_pki.server.key, trustme_pki.ca
    )
    first = holder.current
    assert holder.generation == 1

    # A connection opened before the reload keeps working after it.
    a, b = socket.socketpair()
    old_server = TlsStream(a, holder.current, server_side=True)
    old_client = TlsStream(b, _client_ctx(trustme_pki), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake, old_server, TIMEOUT)
        nursery.start_soon(handshake, old_client, TIMEOUT)
    old_fp = peer_identity(old_client).fingerprint_sha256

    # Rotate the server certificate in place, under a new CA so the change is visible.
    rotated = trustme.CA()
    rotated.cert_pem.write_to_path(str(tmp_path / "rotated-ca.pem"))
    _write_trustme(rotated.issue_cert("localhost"), tmp_path, "server")  # same paths
    assert trustme_pki.server.cert == tmp_path / "server.pem"
    assert holder.reload() is holder.current
    assert holder.current is not first
    assert holder.generation == 2

    await old_server.send_all(b"still here")
    assert await old_client.receive_some() == b"still here"
    await old_server.aclose()
    await old_client.aclose()

    # New connections present the new certificate.
    client_ctx = client_context(
        trustme_pki.client.cert, trustme_pki.client.key, tmp_path / "rotated-ca.pem"
    )
    _, client = await _exchange(holder.current, client_ctx)
    assert client.identity is not None
    assert client.identity.fingerprint_sha256 != old_fp
    assert client.identity.fingerprint_sha256 == certificates.fingerprint_sha256(
        certificates.load_certificate(tmp_path / "server.pem")
    )


@pytest.mark.parametrize("broken", ["garbage", "missing", "mismatched_key"])
def test_reload_keeps_old_context_on_bad_files(
    tmp_path: Path, trustme_pki: PKI, broken: str
) -> None:
    holder = ReloadableContext.client(
        trustme_pki.client.cert, trustme_pki.client.key, trustme_pki.ca
    )
    before = holder.current
    if broken == "garbage":
        trustme_pki.client.cert.write_text("not a certificate\n")
    elif broken == "missing":
        trustme_pki.client.cert.unlink()
    else:
        trustme_pki.client.key.write_bytes(trustme_pki.server.key.read_bytes())
    expected = (
        r"the key .*client\.key' does not match the certificate .*client\.pem"
        if broken == "mismatched_key"
        else r"cannot load certificate .*client\.pem"
    )
    with pytest.raises(TLSConfigError, match=expected):
        holder.reload()
    assert holder.current is before
    assert holder.generation == 1


def test_bad_ca_file_is_named(tmp_path: Path, trustme_pki: PKI) -> None:
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(TLSConfigError, match=r"cannot load CA .*empty\.pem"):
        server_context(trustme_pki.server.cert, trustme_pki.server.key, tmp_path / "empty.pem")


# --- a real socket -------------------------------------------------------------------------


async def test_mutual_tls_over_loopback(own_pki: PKI) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[PeerIdentity] = []

    async def serve_one(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        tcp = await listeners[0].accept()
        stream = TlsStream.over(tcp, _server_ctx(own_pki), server_side=True)
        await handshake(stream, TIMEOUT)
        seen.append(peer_identity(stream))
        await stream.send_all(await stream.receive_some())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_one)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TlsStream.over(tcp, _client_ctx(own_pki), server_hostname="127.0.0.1")
        await handshake(stream, TIMEOUT)
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        await stream.aclose()
    await listeners[0].aclose()
    assert seen[0].uris == (certificates.DEMO_CLIENT_URI,)
