"""How a session ended: a kind from a closed set, and the text people read.

The kind is the `outcome` label of usbip_gateway_sessions_total (its values are the ones
the Grafana dashboard and alert rules know) and decides whether the end was normal; the
detail is the human text of the logs and the audit log ("closed by client"). Nothing
reads the kind back out of the text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.protocol import Role


class OutcomeKind(enum.Enum):
    """The bounded classes of session ends; each value is a metric label."""

    CLOSED = "closed"  # by either end
    LISTED = "listed"  # a DEVLIST answered
    CANCELLED = "cancelled"  # the gateway stopping
    PROTOCOL_ERROR = "protocol_error"
    DENIED = "denied"  # by policy, at the import or on a reload
    REFUSED = "refused"  # the import, by usbipd
    UPSTREAM_UNREACHABLE = "upstream_unreachable"  # usbipd, or the server gateway
    TLS_FAILED = "tls_failed"
    TIMEOUT = "timeout"  # no request, no reply, or idle
    RESOURCE_LIMIT = "resource_limit"  # over the memory budget
    CONNECTION_LOST = "connection_lost"
    OTHER = "other"

    @property
    def label(self) -> str:
        return self.value


_NORMAL = frozenset({OutcomeKind.CLOSED, OutcomeKind.LISTED, OutcomeKind.CANCELLED})


@dataclass(frozen=True, slots=True)
class Outcome:
    """`side`: who broke the protocol, for a protocol error and only then."""

    kind: OutcomeKind
    detail: str
    side: Role | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, OutcomeKind):
            raise TypeError(f"outcome kind {self.kind!r} is not an OutcomeKind")
        if (self.side is not None) != (self.kind is OutcomeKind.PROTOCOL_ERROR):
            raise ValueError("a side is given for a protocol error, and only for one")

    @property
    def normal(self) -> bool:
        """Closed by either end or by our own shutdown, not by an error."""
        return self.kind in _NORMAL

    def __str__(self) -> str:
        return self.detail


#: A session's outcome until something ends it.
OPEN = Outcome(OutcomeKind.OTHER, "open")


def protocol_error(side: Role, error: object, *, sender: str = "") -> Outcome:
    """`side` broke the protocol; `sender` names it in the text when its role does not
    say enough (usbipd)."""
    return Outcome(
        OutcomeKind.PROTOCOL_ERROR, f"protocol error from {sender or side.value}: {error}", side
    )
