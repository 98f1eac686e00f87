"""What a gateway's own TLS files say about themselves: whether its certificate fits its
role now, when each file stops being valid, and which certificates the CRL revokes.

OpenSSL loads a certificate that expired, that is not valid yet or that is meant for the
other role without a word; the peer then refuses every handshake. These checks say so
at start and on reload, where the operator is looking, instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.transport.identity import PeerIdentity

FilePath = str | os.PathLike[str]
Purpose = Literal["server", "client"]
# Bounded on purpose: the `certificate` label of the expiry metric.
CredentialKind = Literal["own", "ca", "crl"]
CREDENTIAL_KINDS: tuple[CredentialKind, ...] = get_args(CredentialKind)

_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_EKU_NAMES = {"server": "serverAuth", "client": "clientAuth"}
_WHOSE = {"own": "this gateway's certificate", "ca": "the CA certificate", "crl": "the CRL"}


class UnfitCertificate(Exception):
    """The gateway's own certificate cannot work in its role now; the message says why."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """When one of the gateway's TLS files stops being valid (a CRL: its nextUpdate)."""

    kind: CredentialKind
    path: str
    not_after: dt.datetime

    @property
    def what(self) -> str:
        return f"{_WHOSE[self.kind]} {self.path}"


def _first_certificate(path: FilePath) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def check_own_certificate(
    path: FilePath, purpose: Purpose, *, now: dt.datetime | None = None
) -> None:
    """Raise UnfitCertificate if the certificate at `path` cannot serve as `purpose`'s.

    Call after OpenSSL loaded the file (so it is a readable PEM certificate)."""
    now = now or dt.datetime.now(dt.UTC)
    name = os.fspath(path)
    try:
        cert = _first_certificate(path)
    except (OSError, ValueError) as exc:
        raise UnfitCertificate(f"cannot read certificate {name!r}: {exc}") from exc
    if now < cert.not_valid_before_utc:
        raise UnfitCertificate(
            f"certificate {name!r} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"UTC (this host's clock says {now:%Y-%m-%d %H:%M} UTC)"
        )
    if now > cert.not_valid_after_utc:
        raise UnfitCertificate(
            f"certificate {name!r} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            f"issue a new one (`usbip-gateway certs issue --kind {purpose}`)"
        )
    extensions = cert.extensions
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise UnfitCertificate(
                f"certificate {name!r} is a CA certificate, not a {purpose} gateway's"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None  # any purpose
    if eku is not None and not {_EKU[purpose], ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(
        eku
    ):
        other: Purpose = "client" if purpose == "server" else "server"
        raise UnfitCertificate(
            f"certificate {name!r} lacks the {_EKU_NAMES[purpose]} extended key usage a "
            f"{purpose} gateway needs"
            + (f" (it is a {other} certificate)" if _EKU[other] in set(eku) else "")
            + "; peers would refuse it. Issue one with "
            f"`usbip-gateway certs issue --kind {purpose}`"
        )
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise UnfitCertificate(
            f"certificate {name!r}: its key usage does not allow digital signatures, "
            "which a TLS handshake needs"
        )


def read_expiries(cert: FilePath, ca: FilePath, crl: FilePath | None) -> tuple[Expiry, ...]:
    """When the own certificate, the earliest CA certificate and the CRL run out.

    A file that cannot be read here is left out: loading the context reports it."""
    found: list[Expiry] = []
    with contextlib.suppress(OSError, ValueError):
        found.append(Expiry("own", os.fspath(cert), _first_certificate(cert).not_valid_after_utc))
    try:
        cas = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError):
        cas = []
    if cas:
        found.append(Expiry("ca", os.fspath(ca), min(c.not_valid_after_utc for c in cas)))
    if crl is not None:
        try:
            next_update = x509.load_pem_x509_crl(Path(crl).read_bytes()).next_update_utc
        except (OSError, ValueError):
            next_update = None
        if next_update is not None:
            found.append(Expiry("crl", os.fspath(crl), next_update))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Revocations:
    """The certificates a CRL signed by a trusted CA revokes: (issuer, serial) pairs."""

    revoked: frozenset[tuple[bytes, int]]

    def revokes(self, identity: PeerIdentity) -> bool:
        return (identity.issuer, identity.serial) in self.revoked


def read_revocations(crl: FilePath, ca: FilePath) -> Revocations:
    """The CRL's entries, if one of the CA certificates signed it; else none (the TLS
    context refuses such a CRL when it is loaded)."""
    try:
        revocation_list = x509.load_pem_x509_crl(Path(crl).read_bytes())
        cas = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError):
        return Revocations(frozenset())
    issuer = revocation_list.issuer
    if not any(c.subject == issuer and _signed_by(revocation_list, c) for c in cas):
        return Revocations(frozenset())
    der = issuer.public_bytes()
    return Revocations(frozenset((der, entry.serial_number) for entry in revocation_list))


def _signed_by(revocation_list: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return revocation_list.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
