"""Certificate tooling: a small private CA for the gateway pair, and the `certs` CLI.

Everything here is offline file work with `cryptography`; nothing at run time depends on it
except `fingerprint_sha256`, which the TLS layer shares so that logs, `certs show` and the
policy all print the same fingerprint.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_DAYS = 3650
LEAF_DAYS = 365
# Backdate notBefore so a peer whose clock is a little behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=5)
RSA_BITS = 3072

DEMO_CA_CN = "usbip-gateway demo CA"
DEMO_SERVER_CN = "usbip-gateway server"
DEMO_CLIENT_CN = "demo-client"
DEMO_CLIENT_URI = "spiffe://usbip-gateway.local/client/demo"


class PKIError(Exception):
    """A certificate-tooling failure with a message fit for one line on stderr."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        # Unencrypted because the gateway loads it unattended; file mode 0600 protects it.
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class DemoPKI:
    """Paths written by `make_demo_pki`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the DER certificate, no separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise PKIError("common name must not be empty")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise PKIError(f"validity must be at least 1 day, got {days}")
    start = not_before or dt.datetime.now(dt.UTC) - CLOCK_SKEW
    return start, start + dt.timedelta(days=days)


def create_ca(
    common_name: str = "usbip-gateway CA",
    *,
    days: int = CA_DAYS,
    key_type: KeyType = "ec",
    not_before: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = generate_key(key_type)
    start, end = _validity(days, not_before)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _issue_leaf(
    ca: Issued,
    *,
    common_name: str,
    usages: Sequence[x509.ObjectIdentifier],
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | IPAddress],
    uris: Iterable[str],
    days: int,
    key_type: KeyType,
    not_before: dt.datetime | None,
) -> Issued:
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PKIError(f"not an IP address: {ip!r}") from None
    sans.extend(x509.UniformResourceIdentifier(u) for u in uris)
    key = generate_key(key_type)
    start, end = _validity(days, not_before)
    # A leaf that outlives its CA would only fail later and more confusingly.
    end = min(end, ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key transport exists only in TLS 1.2; harmless to allow it there.
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server_cert(
    ca: Issued,
    *,
    common_name: str = DEMO_SERVER_CN,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPAddress] = (),
    uris: Sequence[str] = (),
    days: int = LEAF_DAYS,
    key_type: KeyType = "ec",
    not_before: dt.datetime | None = None,
) -> Issued:
    """A serverAuth certificate; clients check their target host against its SAN DNS/IP."""
    if not dns_names and not ip_addresses:
        raise PKIError("a server certificate needs at least one DNS name or IP address")
    return _issue_leaf(
        ca,
        common_name=common_name,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        uris=uris,
        days=days,
        key_type=key_type,
        not_before=not_before,
    )


def issue_client_cert(
    ca: Issued,
    *,
    common_name: str,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPAddress] = (),
    days: int = LEAF_DAYS,
    key_type: KeyType = "ec",
    not_before: dt.datetime | None = None,
) -> Issued:
    """A clientAuth certificate; the server policy matches its CN, SAN URIs and SAN DNS."""
    return _issue_leaf(
        ca,
        common_name=common_name,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        uris=uris,
        days=days,
        key_type=key_type,
        not_before=not_before,
    )


def issue_dual_cert(
    ca: Issued,
    *,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPAddress] = (),
    uris: Sequence[str] = (),
    days: int = LEAF_DAYS,
    key_type: KeyType = "ec",
    not_before: dt.datetime | None = None,
) -> Issued:
    """serverAuth and clientAuth, for reverse mode, where TLS and USB/IP roles differ: a
    server gateway that dials out is a TLS client, a client gateway that takes dial-ins a
    TLS server. Its DNS names or IP addresses are what the TLS client checks."""
    if not dns_names and not ip_addresses:
        raise PKIError("a certificate used as a TLS server needs a DNS name or IP address")
    return _issue_leaf(
        ca,
        common_name=common_name,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        uris=uris,
        days=days,
        key_type=key_type,
        not_before=not_before,
    )


# --- files -------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write `data` so the file never exists with wider permissions than `mode`."""
    if force:
        # Write beside the target and rename over it: a reader never sees a partial file,
        # and an existing file's (possibly wider) mode is not inherited.
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _write_exclusive(tmp, data, mode)
        os.replace(tmp, path)
    else:
        _write_exclusive(path, data, mode)


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise PKIError(f"{path} already exists (use --force to overwrite)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_issued(
    issued: Issued,
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    force: bool = False,
) -> None:
    """Write the certificate (0644) and key (0600); refuse to replace files unless `force`."""
    cert_p, key_p = Path(cert_path), Path(key_path)
    if not force:
        # Check both first so a refusal never leaves half a pair behind.
        for p in (cert_p, key_p):
            if p.exists():
                raise PKIError(f"{p} already exists (use --force to overwrite)")
    _write_new(key_p, issued.key_pem(), 0o600, force=force)
    _write_new(cert_p, issued.cert_pem(), 0o644, force=force)


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PKIError(f"{path}: not a PEM certificate") from None


def load_issued(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Issued:
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise PKIError(f"cannot read {key_path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise PKIError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise PKIError(f"{key_path}: unsupported key type {type(key).__name__}")
    if key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} does not match {cert_path}")
    return Issued(cert, key)


def load_ca(directory: str | os.PathLike[str]) -> Issued:
    d = Path(directory)
    cert_p, key_p = d / "ca.pem", d / "ca.key"
    if not cert_p.exists() or not key_p.exists():
        raise PKIError(
            f"no CA in {d} (need ca.pem and ca.key; run `usbip-gateway certs init --dir {d}`)"
        )
    return load_issued(cert_p, key_p)


def make_demo_pki(directory: str | os.PathLike[str], *, force: bool = False) -> DemoPKI:
    """A throwaway CA plus a loopback server and a demo client, for trying things out."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = DemoPKI(
        d / "ca.pem",
        d / "ca.key",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
    )
    if not force:
        for p in vars(paths).values():
            if p.exists():
                raise PKIError(f"{p} already exists (use --force to overwrite)")
    ca = create_ca(DEMO_CA_CN)
    server = issue_server_cert(
        ca,
        common_name=DEMO_SERVER_CN,
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    client = issue_client_cert(ca, common_name=DEMO_CLIENT_CN, uris=[DEMO_CLIENT_URI])
    write_issued(ca, paths.ca_cert, paths.ca_key, force=force)
    write_issued(server, paths.server_cert, paths.server_key, force=force)
    write_issued(client, paths.client_cert, paths.client_key, force=force)
    return paths


# --- revocation ----------------------------------------------------------------------------

CRL_DAYS = 30


def make_crl(
    ca: Issued, serials: Iterable[int], *, days: int = CRL_DAYS, now: dt.datetime | None = None
) -> x509.CertificateRevocationList:
    """A CRL signed by `ca` listing `serials`; the gateways load it with `tls.crl`."""
    start = now or dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(start - dt.timedelta(minutes=5))
        .next_update(start + dt.timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(start - dt.timedelta(minutes=5))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def revoked_serials(path: Path, ca: Issued) -> set[int]:
    """The serials already in the CRL at `path` (none if it does not exist)."""
    if not path.exists():
        return set()
    crl = x509.load_pem_x509_crl(path.read_bytes())
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        raise PKIError(f"{path} was not issued by the CA in {path.parent}")
    return {entry.serial_number for entry in crl}


def write_crl(directory: Path, serials: Iterable[int], *, days: int = CRL_DAYS) -> Path:
    """(Re)write DIR/crl.pem from DIR's CA, replacing it atomically."""
    ca = load_ca(directory)
    path = directory / "crl.pem"
    data = make_crl(ca, serials, days=days).public_bytes(serialization.Encoding.PEM)
    _write_new(path, data, 0o644, force=True)
    return path


# --- describing ----------------------------------------------------------------------------


def _key_desc(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size}"
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"EC {pub.curve.name}"
    return type(pub).__name__


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


def describe_certificate(cert: x509.Certificate, *, now: dt.datetime | None = None) -> str:
    """Human-readable summary, one field a line."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        state = "not yet valid"
    elif now > end:
        state = "EXPIRED"
    else:
        state = f"{(end - now).days} days left"
    lines = [
        f"subject:     {cert.subject.rfc4514_string()}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
        f"serial:      {cert.serial_number:#x}",
        f"not before:  {start.isoformat()}",
        f"not after:   {end.isoformat()} ({state})",
        f"key:         {_key_desc(cert)}",
    ]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    lines.append(f"CA:          {'yes' if is_ca else 'no'}")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        lines.append("usage:       " + ", ".join(_EKU_NAMES.get(o, o.dotted_string) for o in eku))
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    for label, kind in (
        ("SAN DNS", x509.DNSName),
        ("SAN IP", x509.IPAddress),
        ("SAN URI", x509.UniformResourceIdentifier),
    ):
        values = [str(v) for v in san.get_values_for_type(kind)]
        if values:
            lines.append(f"{label + ':':<13}{', '.join(values)}")
    lines.append(f"sha256:      {fingerprint_sha256(cert)}")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------

CommandFunc = Callable[[argparse.Namespace], int]
