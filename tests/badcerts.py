"""Client certificates OpenSSL accepts but that are no client identity: CA certificates,
and fields the identity parser cannot decode. Signed by the test CA, written as files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from gateway.config import TLSSettings
from gateway.pki.ca import Issued, write_issued

from .pkitools import PKI

PLACEHOLDER_CN = "ZZZZ"  # a UTF8String of 4 bytes that `patch` may swap for another


def der(tag: int, body: bytes) -> bytes:
    """One DER TLV."""
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _ca(pki: PKI) -> Issued:
    key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes()), key)


def issue(
    pki: PKI,
    directory: Path,
    name: str,
    *,
    common_name: str = PLACEHOLDER_CN,
    extensions: tuple[x509.ExtensionType, ...] = (),
    patch: tuple[bytes, bytes] | None = None,
) -> TLSSettings:
    """A client certificate with `extensions`; `patch` = (old, new) replaces bytes of
    the signed part (same length) and signs it again, for encodings no builder makes."""
    ca = _ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    if patch is not None:
        cert = _resign(ca, cert, *patch)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    write_issued(Issued(cert, key), cert_path, key_path, force=True)
    return TLSSettings(cert_path, key_path, pki.ca_pem)


def _resign(ca: Issued, cert: x509.Certificate, old: bytes, new: bytes) -> x509.Certificate:
    assert len(old) == len(new)
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(old) == 1
    tbs = tbs.replace(old, new)
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    algorithm = der(0x30, der(0x06, _ECDSA_WITH_SHA256))
    whole = der(0x30, tbs + algorithm + der(0x03, b"\0" + signature))
    return x509.load_der_x509_certificate(whole)


_ECDSA_WITH_SHA256 = bytes.fromhex("2a8648ce3d040302")  # 1.2.840.10045.4.3.2


def san(*general_names: bytes) -> x509.UnrecognizedExtension:
    """A subjectAltName extension with raw GeneralName encodings, valid or not."""
    return x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, der(0x30, b"".join(general_names))
    )


def subject_string(tag: int, value: bytes) -> tuple[bytes, bytes]:
    """A `patch` giving the placeholder CN another ASN.1 type and 4-byte content."""
    assert len(value) == len(PLACEHOLDER_CN)
    return der(0x0C, PLACEHOLDER_CN.encode()), der(tag, value)
