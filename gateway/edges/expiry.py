"""Warnings ahead of expiry: this gateway's certificate, its CA and its CRL.

An expired CRL refuses every client and an expired certificate every peer, without a
word until the first handshake fails; the log says so first. Checked at start, after
each reload and every hour; a warning is repeated once a day, an escalation at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable

import trio

from gateway.transport.credentials import Expiry

log = logging.getLogger("gateway.expiry")

CHECK_INTERVAL = 3600.0
REPEAT = dt.timedelta(days=1)
_RENEW = {
    "own": "renew it (`usbip-gateway certs issue --force`, then SIGHUP)",
    "ca": "roll the CA over (certs/README.md, Rotation)",
    "crl": "renew it (`usbip-gateway certs crl`); once expired every client is refused",
}


class ExpiryWarnings:
    """Logs each file that expires within `window`; remembers what it said, and when."""

    def __init__(self, window: dt.timedelta) -> None:
        self.window = window
        # (kind, path, not_after) -> (expired?, when last said)
        self._said: dict[tuple[str, str, dt.datetime], tuple[bool, dt.datetime]] = {}

    def check(self, expiries: Iterable[Expiry], now: dt.datetime | None = None) -> list[str]:
        """The messages logged now (for tests); nothing for files far from expiry."""
        now = now or dt.datetime.now(dt.UTC)
        said: list[str] = []
        for expiry in expiries:
            left = expiry.not_after - now
            if left > self.window:
                continue
            expired = left <= dt.timedelta(0)
            key = (expiry.kind, expiry.path, expiry.not_after)
            before = self._said.get(key)
            if before is not None and before[0] == expired and now - before[1] < REPEAT:
                continue
            self._said[key] = (expired, now)
            when = f"{expiry.not_after:%Y-%m-%d %H:%M} UTC"
            if expired:
                message = f"{expiry.what} expired on {when}: {_RENEW[expiry.kind]}"
                log.error("%s", message)
            else:
                message = f"{expiry.what} expires in {_days(left)} ({when}): {_RENEW[expiry.kind]}"
                log.warning("%s", message)
            said.append(message)
        return said


def _days(left: dt.timedelta) -> str:
    if left < dt.timedelta(days=1):
        return f"{left.total_seconds() / 3600:.0f} hours"
    return f"{left.days} day" if left.days == 1 else f"{left.days} days"


async def watch_expiry(warnings: ExpiryWarnings, expiries: Callable[[], Iterable[Expiry]]) -> None:
    """Check now and every CHECK_INTERVAL seconds."""
    while True:
        warnings.check(expiries())
        await trio.sleep(CHECK_INTERVAL)
