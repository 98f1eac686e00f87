"""Test certificates from trustme, written where the gateways read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import Address, ClientConfig, ServerConfig, TLSSettings
from gateway.pki.ca import Issued, issue_client_cert, write_issued

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class PKI:
    """Certificates written where the gateways read them."""

    ca: trustme.CA
    ca_pem: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self) -> TLSSettings:
        return TLSSettings(self.server_cert, self.server_key, self.ca_pem)

    def client_tls(self) -> TLSSettings:
        return TLSSettings(self.client_cert, self.client_key, self.ca_pem)


def write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server = write_leaf(ca.issue_cert("localhost", LOOPBACK), directory, "server")
    client = write_leaf(
        ca.issue_cert("client.test", common_name="test-client"), directory, "client"
    )
    return PKI(ca, ca_pem, *server, *client)


def server_config(pki: PKI, upstream: Address, **kw: object) -> ServerConfig:
    return ServerConfig(
        tls=pki.server_tls(),
        listen=(Address(LOOPBACK, 0),),
        upstream=upstream,
        **kw,  # type: ignore[arg-type]
    )


def client_config(pki: PKI, server: Address, **kw: object) -> ClientConfig:
    return ClientConfig(
        tls=pki.client_tls(),
        server=server,
        server_name="localhost",
        listen=(Address(LOOPBACK, 0),),
        **kw,  # type: ignore[arg-type]
    )


def issue_client(
    pki: PKI, directory: Path, name: str, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()
) -> TLSSettings:
    """A client certificate with SAN URIs (trustme makes none), signed by the test CA."""
    ca = Issued(
        x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes()),
        serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None),  # type: ignore[arg-type]
    )
    leaf = issue_client_cert(ca, common_name=name, uris=list(uris), dns_names=list(dns))
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    write_issued(leaf, cert, key, force=True)
    return TLSSettings(cert, key, pki.ca_pem)
