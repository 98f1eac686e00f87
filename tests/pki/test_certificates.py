"""Certificate tooling: what is issued, how it is written, and the `certs` CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.pki import ca as c
from gateway.pki.cli import add_certs_parser
from gateway.transport.tls import client_context, server_context

SPIFFE = "spiffe://example.org/ns/x/sa/y"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="module")
def ca() -> c.Issued:
    return c.create_ca("unit CA")


# --- issuing -------------------------------------------------------------------------------


def test_ca_defaults_to_ec_p256(ca: c.Issued) -> None:
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert bc.path_length == 0
    assert ca.cert.subject == ca.cert.issuer
    assert _cn(ca.cert) == "unit CA"
    life = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert life == dt.timedelta(days=c.CA_DAYS)


def test_rsa_ca_and_custom_validity() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    rsa_ca = c.create_ca("rsa CA", days=30, key_type="rsa", not_before=start)
    assert isinstance(rsa_ca.key, rsa.RSAPrivateKey)
    assert rsa_ca.key.key_size == 3072
    assert rsa_ca.cert.not_valid_before_utc == start
    assert rsa_ca.cert.not_valid_after_utc == start + dt.timedelta(days=30)


def test_server_cert(ca: c.Issued) -> None:
    srv = c.issue_server_cert(
        ca, common_name="gw", dns_names=["gw.example"], ip_addresses=["10.0.0.1", "::1"]
    )
    srv.cert.verify_directly_issued_by(ca.cert)
    assert _cn(srv.cert) == "gw"
    assert _san(srv.cert).get_values_for_type(x509.DNSName) == ["gw.example"]
    assert _san(srv.cert).get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _eku(srv.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not srv.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_cert_needs_a_name(ca: c.Issued) -> None:
    with pytest.raises(c.PKIError, match="at least one DNS name or IP"):
        c.issue_server_cert(ca)


def test_bad_ip_is_a_clear_error(ca: c.Issued) -> None:
    with pytest.raises(c.PKIError, match=r"not an IP address: 'gw\.example'"):
        c.issue_server_cert(ca, ip_addresses=["gw.example"])


def test_client_cert(ca: c.Issued) -> None:
    cli = c.issue_client_cert(ca, common_name="svc", uris=[SPIFFE], dns_names=["svc.example"])
    cli.cert.verify_directly_issued_by(ca.cert)
    assert _cn(cli.cert) == "svc"
    assert _san(cli.cert).get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    assert _san(cli.cert).get_values_for_type(x509.DNSName) == ["svc.example"]
    assert _eku(cli.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_client_cert_without_sans(ca: c.Issued) -> None:
    cli = c.issue_client_cert(ca, common_name="plain")
    with pytest.raises(x509.ExtensionNotFound):
        _san(cli.cert)


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = c.create_ca("short", days=10)
    leaf = c.issue_client_cert(short_ca, common_name="x", days=365)
    assert leaf.cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


def test_validity_must_be_positive(ca: c.Issued) -> None:
    with pytest.raises(c.PKIError, match="at least 1 day"):
        c.issue_client_cert(ca, common_name="x", days=0)


# --- files ---------------------------------------------------------------------------------


def test_write_modes_and_round_trip(tmp_path: Path, ca: c.Issued) -> None:
    c.write_issued(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(tmp_path / "ca.pem") & 0o022 == 0  # 0644 less whatever the umask removes
    loaded = c.load_issued(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded.cert == ca.cert


def test_refuses_to_overwrite_either_file(tmp_path: Path, ca: c.Issued) -> None:
    (tmp_path / "x.key").write_text("precious")
    with pytest.raises(c.PKIError, match=r"x\.key already exists"):
        c.write_issued(ca, tmp_path / "x.pem", tmp_path / "x.key")
    assert not (tmp_path / "x.pem").exists()  # no half-written pair
    assert (tmp_path / "x.key").read_text() == "precious"


def test_force_replaces_and_tightens_key_mode(tmp_path: Path, ca: c.Issued) -> None:
    key = tmp_path / "x.key"
    key.write_text("old")
    key.chmod(0o644)
    c.write_issued(ca, tmp_path / "x.pem", key, force=True)
    assert _mode(key) == 0o600
    assert c.load_issued(tmp_path / "x.pem", key).cert == ca.cert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.key", "x.pem"]


def test_mismatched_key_is_refused(tmp_path: Path, ca: c.Issued) -> None:
    other = c.create_ca("other")
    c.write_issued(ca, tmp_path / "a.pem", tmp_path / "a.key")
    c.write_issued(other, tmp_path / "b.pem", tmp_path / "b.key")
    with pytest.raises(c.PKIError, match="does not match"):
        c.load_issued(tmp_path / "a.pem", tmp_path / "b.key")


def test_demo_pki(tmp_path: Path) -> None:
    paths = c.make_demo_pki(tmp_path / "pki")
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert _mode(key) == 0o600
    ca_cert = c.load_certificate(paths.ca_cert)
    server = c.load_certificate(paths.server_cert)
    client = c.load_certificate(paths.client_cert)
    server.verify_directly_issued_by(ca_cert)
    client.verify_directly_issued_by(ca_cert)
    assert _cn(server) == "usbip-gateway server"
    assert _san(server).get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in _san(server).get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
    ]
    assert _cn(client) == "demo-client"
    assert _san(client).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://usbip-gateway.local/client/demo"
    ]
    # Both halves load into the TLS contexts the gateways use.
    assert isinstance(
        server_context(paths.server_cert, paths.server_key, paths.ca_cert), ssl.SSLContext
    )
    assert isinstance(
        client_context(paths.client_cert, paths.client_key, paths.ca_cert), ssl.SSLContext
    )
    with pytest.raises(c.PKIError, match="already exists"):
        c.make_demo_pki(tmp_path / "pki")
    c.make_demo_pki(tmp_path / "pki", force=True)
    assert c.load_certificate(paths.ca_cert) != ca_cert


def test_describe_certificate(ca: c.Issued) -> None:
    cli = c.issue_client_cert(ca, common_name="svc", uris=[SPIFFE], dns_names=["svc.example"])
    text = c.describe_certificate(cli.cert)
    assert "subject:     CN=svc" in text
    assert "issuer:      CN=unit CA" in text
    assert f"SAN URI:     {SPIFFE}" in text
    assert "SAN DNS:     svc.example" in text
    assert "usage:       clientAuth" in text
    assert c.fingerprint_sha256(cli.cert) in text
    later = cli.cert.not_valid_after_utc + dt.timedelta(days=1)
    assert "(EXPIRED)" in c.describe_certificate(cli.cert, now=later)


# --- CLI -----------------------------------------------------------------------------------


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="usbip-gateway")
    add_certs_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", *argv])
    result: int = args.func(args)
    return result


def test_cli_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert _run("init", "--dir", d, "--cn", "Lab CA", "--days", "100") == 0
    ca_cert = c.load_certificate(tmp_path / "pki" / "ca.pem")
    assert _cn(ca_cert) == "Lab CA"
    assert (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days == 100

    assert _run(
        "issue", "--dir", d, "--kind", "server", "--name", "gw",
        "--dns", "gw.lab", "gw2.lab", "--ip", "192.0.2.7",
    ) == 0  # fmt: skip
    assert _run(
        "issue", "--dir", d, "--kind", "client", "--name", "alice",
        "--uri", SPIFFE, "--dns", "alice.lab", "--cn", "Alice", "--days", "7",
    ) == 0  # fmt: skip
    gw = c.load_certificate(tmp_path / "pki" / "gw.pem")
    alice = c.load_certificate(tmp_path / "pki" / "alice.pem")
    assert _cn(gw) == "gw"
    assert _san(gw).get_values_for_type(x509.DNSName) == ["gw.lab", "gw2.lab"]
    assert _eku(gw) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _cn(alice) == "Alice"
    assert _eku(alice) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (alice.not_valid_after_utc - alice.not_valid_before_utc).days == 7
    assert _mode(tmp_path / "pki" / "alice.key") == 0o600
    alice.verify_directly_issued_by(ca_cert)

    capsys.readouterr()
    assert _run("show", str(tmp_path / "pki" / "alice.pem")) == 0
    out = capsys.readouterr().out
    assert "subject:     CN=Alice" in out
    assert SPIFFE in out
    assert c.fingerprint_sha256(alice) in out


def test_cli_rsa_ca(tmp_path: Path) -> None:
    assert _run("init", "--dir", str(tmp_path), "--rsa") == 0
    ca = c.load_ca(tmp_path)
    assert isinstance(ca.key, rsa.RSAPrivateKey)


def test_cli_demo(tmp_path: Path) -> None:
    assert _run("demo", "--dir", str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.key", "ca.pem", "client.key", "client.pem", "server.key", "server.pem",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["issue", "--kind", "client", "--name", "x"], "no CA in"),
        (["issue", "--kind", "server", "--name", "x"], "no CA in"),
        (["init"], "ca.pem already exists (use --force to overwrite)"),
        (["issue", "--kind", "client", "--name", "client"], "client.pem already exists"),
        (["issue", "--kind", "server", "--name", "s"], "needs at least one DNS name or IP"),
        (["issue", "--kind", "server", "--name", "s", "--ip", "nope"], "not an IP address"),
        (["issue", "--kind", "client", "--name", "../x"], "plain file name"),
        (["issue", "--kind", "client", "--name", "ca"], "would overwrite the CA"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    pki = tmp_path / "pki"
    if "no CA in" not in message:
        c.make_demo_pki(pki)
    capsys.readouterr()
    assert _run(argv[0], "--dir", str(pki), *argv[1:]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert err.startswith("usbip-gateway certs: error: ")


def test_cli_show_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c.make_demo_pki(tmp_path)
    assert _run("show", str(tmp_path / "ca.key")) == 2
    assert _run("show", str(tmp_path / "missing.pem")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("ca.key: not a PEM certificate")
    assert "missing.pem" in err[1]
    assert "No such file" in err[1]


def test_cli_force_overwrites(tmp_path: Path) -> None:
    assert _run("init", "--dir", str(tmp_path)) == 0
    before = c.load_certificate(tmp_path / "ca.pem")
    assert _run("init", "--dir", str(tmp_path), "--force") == 0
    assert c.load_certificate(tmp_path / "ca.pem") != before
    assert _mode(tmp_path / "ca.key") == 0o600
