"""The `usbip-gateway certs` command: a small CA for the gateway pair."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from gateway.pki.ca import (
    CA_DAYS,
    CRL_DAYS,
    LEAF_DAYS,
    CommandFunc,
    PKIError,
    create_ca,
    describe_certificate,
    issue_client_cert,
    issue_dual_cert,
    issue_server_cert,
    load_ca,
    load_certificate,
    make_demo_pki,
    revoked_serials,
    write_crl,
    write_issued,
)


def _fail(message: str) -> int:
    print(f"usbip-gateway certs: error: {message}", file=sys.stderr)
    return 2


def _guarded(func: CommandFunc) -> CommandFunc:
    """Turn expected failures into one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except PKIError as exc:
            return _fail(str(exc))
        except OSError as exc:
            return _fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))

    return run


def _cmd_init(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    ca = create_ca(args.cn, days=args.days, key_type="rsa" if args.rsa else "ec")
    write_issued(ca, d / "ca.pem", d / "ca.key", force=args.force)
    print(f"wrote {d / 'ca.pem'} and {d / 'ca.key'}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    name: str = args.name
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise PKIError(f"--name must be a plain file name, got {name!r}")
    if name == "ca":
        raise PKIError("--name ca would overwrite the CA")
    d = Path(args.dir)
    ca = load_ca(d)
    issue = {"server": issue_server_cert, "client": issue_client_cert, "both": issue_dual_cert}[
        args.kind
    ]
    issued = issue(
        ca,
        common_name=args.cn or name,
        dns_names=args.dns,
        ip_addresses=args.ip,
        uris=args.uri,
        days=args.days,
    )
    write_issued(issued, d / f"{name}.pem", d / f"{name}.key", force=args.force)
    print(f"wrote {d / f'{name}.pem'} and {d / f'{name}.key'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    paths = make_demo_pki(args.dir, force=args.force)
    print(f"wrote demo CA, server and client certificates to {paths.ca_cert.parent}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    ca = load_ca(d)
    serials = revoked_serials(d / "crl.pem", ca)
    for name in args.certs:
        cert = load_certificate(name)
        try:
            cert.verify_directly_issued_by(ca.cert)  # the signature, not just the name
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PKIError(f"{name} was not issued by the CA in {d}") from exc
        serials.add(cert.serial_number)
    path = write_crl(d, serials, days=args.days)
    print(f"wrote {path}: {len(serials)} revoked, valid for {args.days} days")
    print(crl_use(path, args.days))
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    serials = revoked_serials(d / "crl.pem", load_ca(d))
    path = write_crl(d, serials, days=args.days)
    print(f"wrote {path}: {len(serials)} revoked, valid for {args.days} days")
    print(crl_use(path, args.days))
    return 0


def crl_use(path: Path, days: int) -> str:
    """What a CRL does only if the gateways are told to read it, and what its expiry does."""
    return (
        "A gateway checks certificates against a CRL only if its configuration names it:\n"
        f'  [tls] crl = "{path.resolve()}"   (or --crl {path.resolve()})\n'
        "Without that, revoked certificates are still accepted. A gateway configured with it\n"
        "reloads it on SIGHUP, or by itself within tls.watch_interval (5 s) when tls.watch\n"
        "is on (the default); its open sessions of revoked certificates are closed.\n"
        f"The CRL expires in {days} days: after that every client is refused until\n"
        "`usbip-gateway certs crl` renews it (docs/deployment.md: renewal)."
    )


def _cmd_show(args: argparse.Namespace) -> int:
    print(describe_certificate(load_certificate(args.file)))
    return 0


def add_certs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `certs init|issue|demo|show`; each sets `func(namespace) -> exit status`.

    `subparsers` is what `add_subparsers()` returns (its class is argparse's private)."""
    certs: argparse.ArgumentParser = subparsers.add_parser(
        "certs", help="create and inspect gateway certificates"
    )
    sub = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create a CA (DIR/ca.pem, DIR/ca.key)")
    init.add_argument("--dir", required=True, help="directory for the CA files")
    init.add_argument("--cn", default="usbip-gateway CA", help="CA common name")
    init.add_argument("--days", type=int, default=CA_DAYS, help="validity in days")
    init.add_argument("--rsa", action="store_true", help="RSA 3072 instead of EC P-256")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=_guarded(_cmd_init))

    issue = sub.add_parser("issue", help="issue DIR/NAME.pem and DIR/NAME.key from DIR's CA")
    issue.add_argument("--dir", required=True, help="directory holding ca.pem and ca.key")
    issue.add_argument(
        "--kind",
        required=True,
        choices=("server", "client", "both"),
        help="what the certificate is for; both: serverAuth and clientAuth, for reverse "
        "mode (docs/reverse-connections.md)",
    )
    issue.add_argument("--name", required=True, help="output file stem")
    issue.add_argument("--cn", help="subject common name (default: NAME)")
    for flag, what in (
        ("--dns", "SAN DNS name"),
        ("--ip", "SAN IP address"),
        ("--uri", "SAN URI, e.g. spiffe://example.org/ns/x/sa/y"),
    ):
        issue.add_argument(
            flag,
            action="extend",
            nargs="+",
            default=[],
            metavar="V",
            help=f"{what} (default: none)",
        )
    issue.add_argument("--days", type=int, default=LEAF_DAYS, help="validity in days")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(func=_guarded(_cmd_issue))

    demo = sub.add_parser("demo", help="write a throwaway CA, server and client into DIR")
    demo.add_argument("--dir", required=True, help="directory for the files")
    demo.add_argument("--force", action="store_true", help="overwrite existing files")
    demo.set_defaults(func=_guarded(_cmd_demo))

    revoke = sub.add_parser("revoke", help="add certificates to DIR/crl.pem (signed by DIR's CA)")
    revoke.add_argument("--dir", required=True, help="directory holding ca.pem and ca.key")
    revoke.add_argument("certs", nargs="+", metavar="CERT", help="certificate files to revoke")
    revoke.add_argument("--days", type=int, default=CRL_DAYS, help="CRL validity in days")
    revoke.set_defaults(func=_guarded(_cmd_revoke))

    crl = sub.add_parser("crl", help="write or refresh DIR/crl.pem (renew before it expires)")
    crl.add_argument("--dir", required=True, help="directory holding ca.pem and ca.key")
    crl.add_argument("--days", type=int, default=CRL_DAYS, help="CRL validity in days")
    crl.set_defaults(func=_guarded(_cmd_crl))

    show = sub.add_parser("show", help="print a certificate's subject, SANs, validity")
    show.add_argument("file", help="a PEM certificate")
    show.set_defaults(func=_guarded(_cmd_show))
    return certs
