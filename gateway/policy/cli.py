"""`usbip-gateway policy check FILE` and `policy explain FILE ...`.

Exit status: check gives 0 when the file parses; explain gives 0 for allow and 1 for
block or reject; either gives 2 for an unreadable or invalid file or arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography.x509 import load_pem_x509_certificate

from gateway.transport.identity import PeerIdentity

from .conditions import Target
from .engine import Policy
from .errors import PolicyError, PolicyErrors
from .facts import ClientFacts, DeviceFacts
from .parser import parse_device_spec
from .text import quote

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_ERROR = 2


def add_policy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `policy` command to an argparse subparsers object; leaves set `func`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "policy",
        help="check a device policy file or explain a decision",
        description="Check a policy rules file, or explain what it decides for a client "
        "and a device. See docs/policy.md for the language.",
    )
    commands = parser.add_subparsers(dest="policy_command", required=True)

    check = commands.add_parser("check", help="parse a rules file and report errors")
    check.add_argument("file", type=Path, metavar="FILE", help="the rules file")
    check.set_defaults(func=run_check)

    explain = commands.add_parser(
        "explain",
        help="show which rule decides for a client and a device",
        description="Exit status: 0 allow, 1 block or reject, 2 error.",
    )
    explain.add_argument("file", type=Path, metavar="FILE", help="the rules file")
    explain.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="ID",
        help="cn:NAME, uri:URI or dns:NAME; bare values are URIs when they contain "
        "'://', else common names (repeatable; default: none)",
    )
    explain.add_argument(
        "--cert",
        type=Path,
        metavar="PEM",
        help="take the client from a certificate (default: only --client)",
    )
    device = explain.add_mutually_exclusive_group(required=True)
    device.add_argument(
        "--device",
        metavar="SPEC",
        help='device in rule syntax: \'id 0525:a4a0 busid 1-1 serial "X" '
        "with-interface { ff:00:00 }'",
    )
    device.add_argument("--id", metavar="VID:PID", help="the device by vendor and product id")
    unknown = " (default: unknown)"
    explain.add_argument("--serial", help="with --id: serial number string" + unknown)
    explain.add_argument("--name", help="with --id: product string" + unknown)
    explain.add_argument("--manufacturer", help="with --id: manufacturer string" + unknown)
    explain.add_argument("--busid", help="with --id: bus id on the server" + unknown)
    explain.add_argument(
        "--class", dest="device_class", metavar="CC", help="with --id: device class, hex" + unknown
    )
    explain.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="CC:SS:PP",
        help="with --id: an interface, repeatable, in order (default: none)",
    )
    explain.set_defaults(func=run_explain)
    return parser


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_ERROR


def _load(path: Path) -> Policy | int:
    """The policy in `path`, or the exit status once why it could not be had is printed."""
    try:
        return Policy.parse(path.read_text(encoding="utf-8"), source=str(path))
    except PolicyErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return _fail(f"{path}: {len(exc.errors)} errors")
    except PolicyError as exc:
        return _fail(str(exc))
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"{path}: cannot read: {exc}")


def run_check(args: argparse.Namespace) -> int:
    policy = _load(args.file)
    if isinstance(policy, int):
        return policy
    print(f"{args.file}: ok, {policy.summary()}")
    return EXIT_OK


def client_from_args(values: list[str], cert: Path | None) -> ClientFacts:
    """The client identity from `--client` values and an optional certificate."""
    cn: str | None = None
    uris: list[str] = []
    dns: list[str] = []
    if cert is not None:
        identity = PeerIdentity.from_certificate(load_pem_x509_certificate(cert.read_bytes()))
        cn, uris, dns = identity.common_name, list(identity.uris), list(identity.dns_names)
    for value in values:
        kind, sep, rest = value.partition(":")
        if not (sep and kind in ("cn", "uri", "dns") and not rest.startswith("//")):
            kind, rest = ("uri" if "://" in value else "cn"), value
        if kind == "uri":
            uris.append(rest)
        elif kind == "dns":
            dns.append(rest)
        elif cn is not None and cn != rest:
            raise ValueError(f"two common names: {quote(cn)} and {quote(rest)}")
        else:
            cn = rest
    return ClientFacts(cn, tuple(uris), tuple(dns))


def device_from_args(args: argparse.Namespace) -> DeviceFacts:
    """From `--device SPEC`, or from `--id` and its companion flags (built into a spec)."""
    extras = ("serial", "name", "manufacturer", "busid", "device_class", "interface")
    if args.device is not None:
        used = [name for name in extras if getattr(args, name)]
        if used:
            flag = "--" + used[0].replace("device_class", "class")
            raise ValueError(f"{flag} goes with --id, not --device")
        return parse_device_spec(args.device, "--device")
    parts = [f"id {args.id}"]
    for flag, value in (
        ("serial", args.serial),
        ("name", args.name),
        ("manufacturer", args.manufacturer),
        ("busid", args.busid),
    ):
        if value is not None:
            parts.append(f"{flag} {quote(value)}")
    if args.device_class is not None:
        parts.append(f"class {args.device_class}")
    if args.interface:
        parts.append("with-interface { " + " ".join(args.interface) + " }")
    try:
        return parse_device_spec(" ".join(parts), "arguments")
    except PolicyError as exc:
        # The spec was built here, so a column in it would point at nothing the user typed.
        raise ValueError(exc.message) from None


def run_explain(args: argparse.Namespace) -> int:
    if not args.client and args.cert is None:
        return _fail("explain needs --client or --cert")
    policy = _load(args.file)
    if isinstance(policy, int):
        return policy
    try:
        client = client_from_args(args.client, args.cert)
        device = device_from_args(args)
    except PolicyError as exc:
        return _fail(str(exc))
    except (OSError, ValueError) as exc:
        return _fail(f"explain: {exc}")
    explanation = policy.explain(client, device)
    print(explanation)
    return EXIT_OK if explanation.decision.target is Target.ALLOW else EXIT_DENIED
