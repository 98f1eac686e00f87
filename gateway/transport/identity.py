"""A TLS peer's identity, read from its verified certificate, and what disqualifies one.

OpenSSL has checked the chain before this runs, but it accepts certificates that the
identity parser cannot decode (a SAN URI with non-ASCII bytes, a subject string of an
odd type) and CA certificates presented as leaves. Both are refused here with a bounded
reason, never a traceback.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

# Bounded on purpose: the reason is a metric label.
IdentityRefusal = Literal["ca_certificate", "undecodable"]
IDENTITY_REFUSALS: tuple[IdentityRefusal, ...] = get_args(IdentityRefusal)


class IdentityRefused(Exception):
    """The peer's certificate is not an identity. `fingerprint_sha256` names it in logs."""

    def __init__(self, reason: IdentityRefusal, detail: str, fingerprint_sha256: str) -> None:
        super().__init__(f"certificate refused as an identity: {reason} ({detail})")
        self.reason: IdentityRefusal = reason
        self.detail = detail
        self.fingerprint_sha256 = fingerprint_sha256


@dataclass(frozen=True)
class PeerIdentity:
    """What the policy can match about a verified peer."""

    common_name: str | None
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    fingerprint_sha256: str
    serial: int
    # basicConstraints CA:TRUE or the keyCertSign key usage: a certificate that can
    # sign others is an authority, not a client.
    signs_certificates: bool = False
    # The issuer's name (DER): with the serial, what a CRL entry names.
    issuer: bytes = b""

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        """Raises IdentityRefused("undecodable") if a field it reads cannot be decoded."""
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        try:
            return cls._decode(cert, fingerprint)
        except Exception as exc:
            # cryptography decodes lazily and raises ValueError, KeyError (an attribute
            # value of a non-string type) or UnsupportedGeneralNameType, depending on the
            # field: whatever it is, this certificate names no one we can match.
            raise IdentityRefused("undecodable", _describe(exc), fingerprint) from exc

    @classmethod
    def _decode(cls, cert: x509.Certificate, fingerprint: str) -> PeerIdentity:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        extensions = cert.extensions
        try:
            san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        return cls(
            common_name=str(cns[0].value) if cns else None,
            uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
            dns_names=tuple(san.get_values_for_type(x509.DNSName)),
            fingerprint_sha256=fingerprint,
            serial=cert.serial_number,
            signs_certificates=_signs_certificates(extensions),
            issuer=cert.issuer.public_bytes(),
        )

    def __str__(self) -> str:
        if self.uris:
            return self.uris[0]
        if self.common_name:
            return f"CN={self.common_name}"
        return f"sha256:{self.fingerprint_sha256[:16]}"

    def as_dict(self) -> dict[str, object]:
        return {
            "common_name": self.common_name,
            "uris": list(self.uris),
            "dns_names": list(self.dns_names),
            "fingerprint_sha256": self.fingerprint_sha256,
            # Hex string: serials are up to 159 bits, beyond what JSON numbers carry safely.
            "serial": f"{self.serial:x}",
        }


def _signs_certificates(extensions: x509.Extensions) -> bool:
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return True
    except x509.ExtensionNotFound:
        pass
    try:
        return extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return False


def _describe(exc: Exception) -> str:
    # The first line only: cryptography's parse errors can be long and name Rust types.
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def identity_from_der(der: bytes) -> PeerIdentity:
    """The identity in a DER certificate; IdentityRefused if it cannot be read as one."""
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityRefused("undecodable", _describe(exc), fingerprint) from exc
    return PeerIdentity.from_certificate(cert)


def client_identity(der: bytes) -> PeerIdentity:
    """`identity_from_der`, also refusing certificates that can sign other certificates."""
    identity = identity_from_der(der)
    if identity.signs_certificates:
        raise IdentityRefused(
            "ca_certificate",
            "basicConstraints CA:TRUE or keyCertSign: an authority, not a client",
            identity.fingerprint_sha256,
        )
    return identity
