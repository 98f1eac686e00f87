"""Mutual TLS between the two gateways, on the standard library's `ssl`
(`gateway.transport.tls_stream` carries it).

Both sides require a certificate from the other, signed by the configured CA. TLS 1.3 is the
default floor. Compression is negotiated with ALPN (`ALPN_ZSTD`), so a peer that does not
compress still interoperates on `ALPN_PLAIN`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Protocol, get_args

import trio

from gateway.transport.credentials import (
    Expiry,
    Purpose,
    UnfitCertificate,
    check_own_certificate,
    read_expiries,
)
from gateway.transport.identity import PeerIdentity, identity_from_der
from gateway.transport.tls_stream import TlsStream

ALPN_PLAIN = "usbip-gw/1"
ALPN_ZSTD = "usbip-gw/1+zstd2"  # /2: chunks are independent frames (compression.py)
DEFAULT_ALPN: tuple[str, ...] = (ALPN_PLAIN,)

FilePath = str | os.PathLike[str]

# Bounded on purpose: the reason is a metric label.
HandshakeReason = Literal[
    "timeout",
    "no_certificate",
    "unknown_ca",
    "bad_certificate",
    "certificate_expired",
    "certificate_revoked",
    "hostname_mismatch",
    "protocol_version",
    "not_tls",
    "eof",
    "other",
]
HANDSHAKE_REASONS: tuple[HandshakeReason, ...] = get_args(HandshakeReason)


class TLSConfigError(Exception):
    """Certificate, key or CA files could not be loaded into a context."""


# --- contexts ----------------------------------------------------------------------------


def _check_version(min_version: ssl.TLSVersion) -> None:
    if min_version not in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        raise ValueError(f"min_version must be TLSv1_2 or TLSv1_3, not {min_version.name}")


def _load(
    ctx: ssl.SSLContext,
    cert: FilePath,
    key: FilePath,
    ca: FilePath,
    crl: FilePath | None,
) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA {os.fspath(ca)!r}: {_short(exc)}") from exc
    if crl is not None:
        _load_crl(ctx, crl)
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"the key {os.fspath(key)!r} does not match the certificate {os.fspath(cert)!r}"
            ) from exc
        raise TLSConfigError(
            f"cannot load certificate {os.fspath(cert)!r} with key {os.fspath(key)!r}: "
            f"{_short(exc)}"
        ) from exc
    except OSError as exc:
        raise TLSConfigError(
            f"cannot load certificate {os.fspath(cert)!r} with key {os.fspath(key)!r}: "
            f"{_short(exc)}"
        ) from exc


def _load_crl(ctx: ssl.SSLContext, crl: FilePath) -> None:
    """Check the peer's certificate against the CA's revocation list (PEM)."""
    try:
        text = Path(crl).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read CRL {os.fspath(crl)!r}: {_short(exc)}") from exc
    if b"-----BEGIN X509 CRL-----" not in text:
        raise TLSConfigError(f"{os.fspath(crl)!r} holds no PEM CRL")
    try:
        # OpenSSL reads CRLs from a PEM file given as `cafile` (`cadata` takes certs only).
        ctx.load_verify_locations(cafile=crl)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot load CRL {os.fspath(crl)!r}: {_short(exc)}") from exc
    # The leaf only: the CA that signs the CRL is the root the peer chains to.
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _short(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def server_context(
    cert: FilePath,
    key: FilePath,
    ca: FilePath,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    alpn: Sequence[str] = DEFAULT_ALPN,
    crl: FilePath | None = None,
) -> ssl.SSLContext:
    """A server context that demands a client certificate signed by `ca`.

    ALPN order is the server's preference.
    """
    _check_version(min_version)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Clients never resume sessions, so tickets would be bytes on the wire for nothing.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    _load(ctx, cert, key, ca, crl)
    return ctx


def client_context(
    cert: FilePath,
    key: FilePath,
    ca: FilePath,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    alpn: Sequence[str] = DEFAULT_ALPN,
    crl: FilePath | None = None,
) -> ssl.SSLContext:
    """A client context that presents `cert` and checks the server's chain and hostname.

    Pass the server's DNS name or IP address as `server_hostname` to `TlsStream`.
    """
    _check_version(min_version)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = min_version
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    _load(ctx, cert, key, ca, crl)
    return ctx


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The files a context is built from: this gateway's certificate and key, the CA
    the peer's certificate must chain to, and optionally the CA's revocation list."""

    cert: FilePath
    key: FilePath
    ca: FilePath
    crl: FilePath | None = None


class ReloadableContext:
    """Holds the live SSLContext; `reload()` rebuilds it from the files (SIGHUP).

    Connections take `.current` when they start, so a reload affects new connections only.
    A failed reload raises and leaves `.current`, `.files` and `.expiries` as they were.
    """

    def __init__(self, build: Callable[[TLSFiles], ssl.SSLContext], files: TLSFiles) -> None:
        self._build = build
        self._current = build(files)
        self.files = files
        self.expiries = _expiries(files)
        self.generation = 1

    @classmethod
    def server(
        cls,
        cert: FilePath,
        key: FilePath,
        ca: FilePath,
        *,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        alpn: Sequence[str] = DEFAULT_ALPN,
        crl: FilePath | None = None,
    ) -> ReloadableContext:
        build = partial(_build, "server", server_context, min_version, tuple(alpn))
        return cls(build, TLSFiles(cert, key, ca, crl))

    @classmethod
    def client(
        cls,
        cert: FilePath,
        key: FilePath,
        ca: FilePath,
        *,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        alpn: Sequence[str] = DEFAULT_ALPN,
        crl: FilePath | None = None,
    ) -> ReloadableContext:
        build = partial(_build, "client", client_context, min_version, tuple(alpn))
        return cls(build, TLSFiles(cert, key, ca, crl))

    @property
    def current(self) -> ssl.SSLContext:
        return self._current

    def reload(self, files: TLSFiles | None = None) -> ssl.SSLContext:
        """Rebuild from the same files, or from `files` (paths changed in the config)."""
        files = files or self.files
        new = self._build(files)  # raises TLSConfigError before anything changes
        self._current = new  # one assignment: readers see the old or the new, never a mix
        self.files = files
        self.expiries = _expiries(files)
        self.generation += 1
        return new


def _build(
    purpose: Purpose,
    make: Callable[..., ssl.SSLContext],
    min_version: ssl.TLSVersion,
    alpn: tuple[str, ...],
    files: TLSFiles,
) -> ssl.SSLContext:
    """A gateway's context: OpenSSL reads the files first (its errors come first), then
    the own certificate must fit the gateway's role now (a test peer's need not)."""
    context = make(
        files.cert, files.key, files.ca, min_version=min_version, alpn=alpn, crl=files.crl
    )
    try:
        check_own_certificate(files.cert, purpose)
    except UnfitCertificate as exc:
        raise TLSConfigError(str(exc)) from exc
    return context


def _expiries(files: TLSFiles) -> tuple[Expiry, ...]:
    return read_expiries(files.cert, files.ca, files.crl)


# --- peer identity -----------------------------------------------------------------------


class HasPeer(Protocol):
    """A TLS stream after its handshake (`TlsStream`; `trio.SSLStream` in test peers)."""

    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...

    def selected_alpn_protocol(self) -> str | None: ...


def peer_certificate(stream: HasPeer) -> bytes:
    """The peer's verified certificate (DER); call after the handshake."""
    der: bytes | None = stream.getpeercert(binary_form=True)
    if der is None:
        raise ValueError("peer presented no certificate")
    return der


def peer_identity(stream: HasPeer) -> PeerIdentity:
    """The identity in the peer's verified certificate; IdentityRefused if it has none.

    Parsed from the DER form with `cryptography`: one parse gives the fingerprint, the
    serial and every SAN as typed values, where `getpeercert()`'s dict form has only
    display strings.
    """
    return identity_from_der(peer_certificate(stream))


def negotiated_alpn(stream: HasPeer) -> str | None:
    """The ALPN protocol both sides agreed on, or None if they share none."""
    proto: str | None = stream.selected_alpn_protocol()
    return proto


# --- handshake ---------------------------------------------------------------------------


class HandshakeFailed(Exception):
    """The TLS handshake did not complete. `reason` is bounded; `detail` is for logs."""

    def __init__(self, reason: HandshakeReason, detail: str = "") -> None:
        super().__init__(f"TLS handshake failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason: HandshakeReason = reason
        self.detail = detail


# OpenSSL verify codes (X509_V_ERR_*) from our own verification of the peer's chain.
_VERIFY_CODES: dict[int, HandshakeReason] = {
    2: "unknown_ca",  # unable to get issuer certificate
    10: "certificate_expired",
    23: "certificate_revoked",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
}

# OpenSSL reason codes: our own failures, and alerts the peer sent about us.
_SSL_REASONS: dict[str, HandshakeReason] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate_revoked",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "WRONG_VERSION_NUMBER": "not_tls",  # e.g. plain USB/IP sent to the TLS port
    "HTTP_REQUEST": "not_tls",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__
    return None


def failure_reason(exc: BaseException) -> HandshakeReason:
    """Map an error from a handshake, or from the first read after it, to a reason.

    With TLS 1.3 the client finishes its handshake before the server has checked the
    client certificate, so a client learns of its rejection on its first receive; pass
    that error here to get the same reason the server reports.
    """
    if isinstance(exc, HandshakeFailed):
        return exc.reason
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    cause = _ssl_cause(exc)
    if cause is None:
        # Broken transport underneath (reset, closed) before TLS said anything.
        return "eof" if isinstance(exc, trio.BrokenResourceError | OSError) else "other"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(cause.verify_code, "bad_certificate")
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "eof"
    return _SSL_REASONS.get(cause.reason or "", "other")


def _detail(exc: BaseException) -> str:
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return str(cause.verify_message)
    if cause is not None:
        return _short(cause)
    return str(exc.__cause__ or exc) or type(exc).__name__


async def handshake(stream: TlsStream, timeout: float) -> None:
    """Complete the handshake within `timeout` seconds or raise HandshakeFailed.

    OpenSSL writes an alert it has for the peer ("unknown CA", "certificate required")
    to the socket itself before the error reaches us, so the peer learns why.
    """
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise HandshakeFailed("timeout", f"no handshake within {timeout:g}s") from None
    except trio.BrokenResourceError as exc:
        raise HandshakeFailed(failure_reason(exc), _detail(exc)) from exc
