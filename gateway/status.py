"""`usbip-gateway status`: a gateway's /status as a table, for people who would rather
look than curl. Plain blocking HTTP from the standard library: one request, one answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.commands import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE

DEFAULT_METRICS = "127.0.0.1:9240"
TIMEOUT = 5.0

COLUMNS = ("ID", "IDENTITY", "DEVICE", "BYTES IN", "BYTES OUT", "IN FLIGHT", "P50", "P99")


class StatusError(Exception):
    """The endpoint could not be reached or did not answer with a /status document."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def fetch_status(address: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The /status document of the gateway whose HTTP endpoint is at HOST:PORT."""
    import urllib.request  # noqa: PLC0415 - it imports ssl: not for `status --help`

    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as exc:
        hint = " (is /status turned off with --metrics-no-status?)" if exc.code == 404 else ""
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise StatusError(
            f"cannot reach {url}: {reason} (is the gateway running with "
            f"--metrics-listen {address}?)",
            unreachable=True,
        ) from None
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("sessions"), list):
        raise StatusError(f"{url}: the answer is not a gateway's /status document")
    return document


def _bytes(count: object) -> str:
    if not isinstance(count, int):
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _ms(seconds: object) -> str:
    return f"{seconds * 1000:.2f} ms" if isinstance(seconds, int | float) else "-"


def _text(value: object) -> str:
    # Identities and bus ids come from peers: nothing in them may move the terminal.
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "-"


def session_row(session: Mapping[str, Any]) -> tuple[str, ...]:
    device = session.get("device") or session.get("busid") or session.get("request")
    return (
        _text(session.get("id")),
        _text(session.get("identity")),
        _text(device),
        _bytes(session.get("bytes_from_client")),
        _bytes(session.get("bytes_from_server")),
        _text(session.get("in_flight")),
        _ms(session.get("rtt_p50_seconds")),
        _ms(session.get("rtt_p99_seconds")),
    )


def render(document: Mapping[str, Any]) -> str:
    """A heading line for the gateway, then one row per session."""
    sessions: Sequence[Mapping[str, Any]] = [
        s for s in document.get("sessions", []) if isinstance(s, Mapping)
    ]
    upstream = document.get("upstream_up")
    heading = (
        f"{_text(document.get('role'))} gateway {_text(document.get('version'))}, "
        f"{'listening' if document.get('listening') else 'not listening'}"
        + ("" if upstream is None else f", usbipd {'up' if upstream else 'DOWN'}")
        + f", {len(sessions)} session{'s' if len(sessions) != 1 else ''}"
    )
    if not sessions:
        return heading + "\n"
    rows = [COLUMNS, *(session_row(s) for s in sessions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return heading + "\n" + "\n".join(lines) + "\n"


def run_status(args: argparse.Namespace) -> int:
    try:
        document = fetch_status(args.metrics, args.timeout)
    except StatusError as exc:
        print(f"usbip-gateway status: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.unreachable else EXIT_FAILURE
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        sys.stdout.write(render(document))
    return EXIT_OK


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="a table of a gateway's sessions, from its /status endpoint",
        description="Identity, device, bytes each way, URBs in flight and round-trip "
        "p50/p99 of every session, read from the gateway's HTTP endpoint "
        "(--metrics-listen or --metrics-status-listen). Exit status: 0 shown, "
        "1 the answer was not a /status document, 3 unreachable.",
    )
    parser.add_argument(
        "--metrics",
        default=DEFAULT_METRICS,
        metavar="HOST:PORT",
        help="the gateway's HTTP endpoint",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, metavar="SECONDS", help="for the answer"
    )
    parser.add_argument("--json", action="store_true", help="print the document as it came")
    parser.set_defaults(func=run_status)
    return parser
