"""What a relay knows about one session: who, which device, how much, how it ended.

Pure bookkeeping: the relay passes the clock readings in. With metrics on, a
`SessionMeter` also records each URB's round-trip time, transfer type, direction and
result; `observe` is the relay's per-frame path, so it does no more than that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.accounting.outcome import OPEN, Outcome, OutcomeKind
from gateway.config import GatewayRole
from gateway.protocol import (
    CmdSubmit,
    Frame,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    RetSubmit,
    RetUnlink,
    Role,
)

if TYPE_CHECKING:
    from gateway.accounting.series import SessionMeter

_ids = itertools.count(1)

_CLIENT = Role.CLIENT  # per frame: a plain name, not an Enum class attribute


@dataclass(slots=True)
class Session:
    role: GatewayRole  # which gateway this is
    peer: str  # the TLS identity (server role) or the local client address
    address: str
    started: float  # wall-clock seconds, for humans
    id: int = field(default_factory=lambda: next(_ids))
    request: str = ""  # "devlist" or "import"
    busid: str = ""  # as requested
    device: str = ""  # the bus id usbipd answered an accepted import with
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    urbs_submitted: int = 0
    urbs_completed: int = 0
    urbs_failed: int = 0
    urbs_unlinked: int = 0
    outcome: Outcome = OPEN
    op_status: int | None = None  # the op reply's status, once one went through
    # The link between the gateways (server role: this connection; client role: the one
    # to the server gateway): "tcp" or "mptcp", and "zstd" or "none" as negotiated.
    transport: str = "tcp"
    compression: str = "none"
    # Which gateway opened that connection: the client (the usual way) or the server
    # (reverse mode: a device host that dials out).
    dialer: GatewayRole = "client"
    meter: SessionMeter | None = None  # URB metrics; None when they are off

    def observe(self, sender: Role, frame: Frame, now: float) -> None:
        """Account one frame; `now` is a monotonic clock reading."""
        event = frame.event
        kind = type(event)
        if sender is _CLIENT:
            self.bytes_from_client += len(frame.raw)
            if kind is CmdSubmit:
                self.urbs_submitted += 1
                if frame.urb is not None:
                    frame.urb.submitted_at = now
            elif kind is OpRequestImport:
                self.request = "import"
                self.busid = event.busid  # type: ignore[union-attr]
            elif kind is OpRequestDevlist:
                self.request = "devlist"
        else:
            self.bytes_from_server += len(frame.raw)
            if kind is RetSubmit:
                self.urbs_completed += 1
                if event.status != 0:  # type: ignore[union-attr]
                    self.urbs_failed += 1
                if self.meter is not None and frame.urb is not None:
                    self.meter.completed(frame.urb, event, now)  # type: ignore[arg-type]
            elif kind is RetUnlink and frame.urb is not None:
                self.urbs_unlinked += 1
                if self.meter is not None:
                    self.meter.unlinked(frame.urb)
            elif kind is OpReplyImport:
                self.op_status = event.status  # type: ignore[union-attr]
                if event.status != 0:  # type: ignore[union-attr]
                    self.outcome = Outcome(
                        OutcomeKind.REFUSED,
                        f"import refused by usbipd (status {event.status})",  # type: ignore[union-attr]
                    )
                else:
                    device = event.device  # type: ignore[union-attr]
                    self.device = device.busid if device is not None else self.busid
                    if self.meter is not None:
                        self.meter.imported(self.busid, device)
            elif kind is OpReplyDevlist:
                self.op_status = event.status  # type: ignore[union-attr]

    @property
    def urbs_in_flight(self) -> int:
        """Submitted and not yet answered by a RET_SUBMIT or a RET_UNLINK."""
        return self.urbs_submitted - self.urbs_completed - self.urbs_unlinked

    @property
    def ended_normally(self) -> bool:
        """Closed by either end or by our own shutdown, not by an error."""
        return self.outcome.normal

    def summary(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "role": self.role,
            "peer": self.peer,
            "address": self.address,
            "request": self.request,
            "busid": self.busid,
            "outcome": self.outcome.detail,
            "urbs": self.urbs_submitted,
            "urbs_failed": self.urbs_failed,
            "urbs_unlinked": self.urbs_unlinked,
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_server": self.bytes_from_server,
            "transport": self.transport,
            "compression": self.compression,
            "dialer": self.dialer,
        }
