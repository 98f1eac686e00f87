"""What one USB/IP connection has said so far, and whether the next message may follow.

Both directions share one `ProtocolState`: a RET_SUBMIT's length depends on the
CMD_SUBMIT it answers, the URB phase begins with the IMPORT reply, and endpoint
transfer types come from control replies. `apply` is called for every message in
order, whoever sent it, and raises the error class the caller names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .constants import (
    KERNEL_MAX_ISO_PACKETS,
    NO_ISO_PACKETS,
    URB_DMA_MAP_SG,
    Direction,
    OpStatus,
    TransferType,
)
from .descriptors import Setup
from .errors import ProtocolError
from .events import (
    CmdSubmit,
    CmdUnlink,
    Event,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    RetSubmit,
    RetUnlink,
)
from .layout import DeviceLayout, LayoutChange, layout_change
from .records import DeviceInfo

# number_of_packets of a non-isochronous URB: Linux vhci's 0, or usbip-win2's -1.
_NO_ISO = frozenset((0, NO_ISO_PACKETS))


class Role(enum.Enum):
    CLIENT = "client"  # the importer: `usbip`, vhci-hcd
    SERVER = "server"  # the exporter: usbipd, usbip-host

    @property
    def peer(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


class Phase(enum.Enum):
    OP_REQUEST = "op-request"  # the client has not asked anything yet
    DEVLIST_REPLY = "devlist-reply"
    IMPORT_REPLY = "import-reply"
    URB = "urb"  # after a successful import, until the connection ends
    DONE = "done"  # a DEVLIST answered or an IMPORT refused: only closing is left
    ERROR = "error"


# Members the per-URB path compares with, as plain names: on Python 3.11 reading an
# attribute of an Enum class goes through its metaclass's __getattr__ hook (~65 ns).
_CLIENT, _URB, _ERROR = Role.CLIENT, Phase.URB, Phase.ERROR
_OUT, _IN = Direction.OUT, Direction.IN
_ISO, _UNKNOWN = TransferType.ISOCHRONOUS, TransferType.UNKNOWN


@dataclass(frozen=True, slots=True)
class Limits:
    """DoS bounds. The kernel stub caps ISO packets at 1024 and nothing else."""

    max_transfer_length: int = 16 * 1024 * 1024
    max_iso_packets: int = KERNEL_MAX_ISO_PACKETS
    max_pending_urbs: int = 1024
    max_devices: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.max_transfer_length < 2**31:
            raise ValueError("max_transfer_length must be between 1 and 2**31-1")
        if not 0 < self.max_iso_packets <= KERNEL_MAX_ISO_PACKETS:
            raise ValueError(f"max_iso_packets must be between 1 and {KERNEL_MAX_ISO_PACKETS}")
        if self.max_pending_urbs < 1 or self.max_devices < 1:
            raise ValueError("max_pending_urbs and max_devices must be positive")


@dataclass(slots=True)
class PendingUrb:
    """A submitted URB awaiting its RET_SUBMIT or RET_UNLINK.

    `submitted_at` is for the I/O layer's clock; this layer never reads a clock.
    """

    seqnum: int
    ep: int
    direction: Direction
    transfer_type: TransferType
    iso: bool
    transfer_buffer_length: int
    number_of_packets: int
    setup: Setup | None = None
    submitted_at: float = 0.0
    unlinked: bool = False
    change: LayoutChange | None = None  # a SET_CONFIGURATION/SET_INTERFACE the stub runs


def event_name(event: Event) -> str:
    return type(event).__name__


class ProtocolState:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.phase = Phase.OP_REQUEST
        self.requested_busid: str | None = None
        self.imported: DeviceInfo | None = None
        self.layout = DeviceLayout()
        # Where the exporting host's own view can be read after a layout change (the
        # server gateway's sysfs): returns (active configuration, {interface: alt}).
        self.confirm_layout: Callable[[], tuple[int, Mapping[int, int]] | None] | None = None
        self.pending: dict[int, PendingUrb] = {}
        self._unlinks: dict[int, int] = {}  # CMD_UNLINK seqnum -> seqnum it unlinks
        # URBs whose unlink was answered while they were still pending here. Usually no
        # RET_SUBMIT follows, but one may (see `_unlinked`); they no longer count as in
        # flight, and the oldest are forgotten past `limits.max_pending_urbs`.
        self._answered: dict[int, PendingUrb] = {}

    def awaiting(self, seqnum: int) -> PendingUrb | None:
        """The URB a RET_SUBMIT for `seqnum` would complete, if one may come."""
        return self.pending.get(seqnum) or self._answered.get(seqnum)

    def transfer_type(self, ep: int, direction: Direction) -> TransferType | None:
        """The endpoint as usbip-host will find it: None if absent, UNKNOWN if unknowable."""
        return self.layout.transfer_type(ep, direction)

    def submit_header_error(
        self, ep: int, direction: int, number_of_packets: int, flags: int, length: int
    ) -> tuple[str | None, bool]:
        """Why a CMD_SUBMIT with this header is refused (None if it is not), and whether
        ISO descriptors follow it. Everything that decides where usbip-host ends the
        frame is here, so the reader can refuse before it waits for any payload."""
        if direction not in (_OUT, _IN):
            return f"direction {direction} is neither 0 nor 1", False
        if not 0 <= length <= self.limits.max_transfer_length:
            return (
                f"transfer_buffer_length {length} is outside 0..{self.limits.max_transfer_length}"
            ), False
        kind = self.layout.transfer_type(ep, direction)  # type: ignore[arg-type]
        np = number_of_packets
        iso = kind is _ISO
        if iso:
            fits = 0 < np <= self.limits.max_iso_packets
        else:  # runs for every URB: no message is built unless it is needed
            fits = kind is not None and kind is not _UNKNOWN and np in _NO_ISO
        if fits and not (flags & URB_DMA_MAP_SG and length == 0):
            return None, iso
        return self._framing_reason(kind, ep, Direction(direction), np), iso

    @staticmethod
    def reply_header_error(
        urb: PendingUrb, actual_length: int, number_of_packets: int
    ) -> str | None:
        """Why a RET_SUBMIT header for `urb` is refused: what decides its length (data
        only for IN, at most the buffer; descriptors only for ISO, at most the URB's)."""
        if not 0 <= actual_length <= urb.transfer_buffer_length:
            return (
                f"RET_SUBMIT actual_length {actual_length} is outside "
                f"0..{urb.transfer_buffer_length} (the length asked for)"
            )
        if urb.iso and number_of_packets > urb.number_of_packets:
            return (
                f"RET_SUBMIT has {number_of_packets} ISO packets, "
                f"the URB had {urb.number_of_packets}"
            )
        return None

    def _framing_reason(
        self, kind: TransferType | None, ep: int, direction: Direction, np: int
    ) -> str:
        where = f"endpoint {ep} {direction.name}"
        if kind is None:
            return f"{where} does not exist on the device (usbip-host would read no payload)"
        if kind is TransferType.UNKNOWN:
            return (
                f"the type of {where} is not known for certain (descriptors not seen, or "
                "a configuration or alt setting change not settled)"
            )
        if kind is TransferType.ISOCHRONOUS:
            shown = np if np != NO_ISO_PACKETS else -1
            if not 0 < np <= self.limits.max_iso_packets:
                return (
                    f"{shown} ISO packets on isochronous {where} is outside "
                    f"1..{self.limits.max_iso_packets}"
                )
        elif np not in _NO_ISO:
            return f"number_of_packets {np} on {kind.name.lower()} {where}"
        return "a scatter-gather URB with no buffer (usbip-host drops the connection)"

    def apply(
        self,
        sender: Role,
        event: Event,
        error: type[ProtocolError],
        *,
        header_checked: bool = False,
    ) -> PendingUrb | None:
        """Check `event` from `sender` against the state and advance it.

        Returns the URB the event submitted, completed or unlinked, if any.
        `header_checked`: a reader already applied `submit_header_error` to this
        CMD_SUBMIT's header against this state (the per-URB path does it once).
        """
        try:
            return self._apply(sender, event, error, header_checked)
        except ProtocolError:
            self.phase = _ERROR
            raise

    def _apply(
        self, sender: Role, event: Event, error: type[ProtocolError], header_checked: bool
    ) -> PendingUrb | None:
        phase = self.phase
        kind = type(event)
        if phase is _URB:
            if sender is _CLIENT:
                if kind is CmdSubmit:
                    return self._submit(event, error, header_checked)  # type: ignore[arg-type]
                if kind is CmdUnlink:
                    return self._unlink(event, error)  # type: ignore[arg-type]
            else:
                if kind is RetSubmit:
                    return self._complete(event, error)  # type: ignore[arg-type]
                if kind is RetUnlink:
                    return self._unlinked(event)  # type: ignore[arg-type]
        elif phase is Phase.OP_REQUEST and sender is _CLIENT:
            if kind is OpRequestDevlist:
                self.phase = Phase.DEVLIST_REPLY
                return None
            if kind is OpRequestImport:
                self.requested_busid = event.busid  # type: ignore[union-attr]
                self.phase = Phase.IMPORT_REPLY
                return None
        elif phase is Phase.DEVLIST_REPLY and sender is Role.SERVER and kind is OpReplyDevlist:
            if len(event.devices) > self.limits.max_devices:  # type: ignore[union-attr]
                raise error(f"DEVLIST reply lists more than {self.limits.max_devices} devices")
            self.phase = Phase.DONE
            return None
        elif phase is Phase.IMPORT_REPLY and sender is Role.SERVER and kind is OpReplyImport:
            self._imported(event, error)  # type: ignore[arg-type]
            return None
        if phase is _ERROR:
            raise error("the connection already failed")
        raise error(
            f"{event_name(event)} from the {sender.value} is not allowed in phase {phase.value}"
        )

    def _imported(self, event: OpReplyImport, error: type[ProtocolError]) -> None:
        if event.status != OpStatus.OK or event.device is None:
            self.phase = Phase.DONE
            return
        if event.device.busid != self.requested_busid:
            raise error(
                f"IMPORT reply is for bus id {event.device.busid!r}, "
                f"not the requested {self.requested_busid!r}"
            )
        self.imported = event.device
        self.layout = DeviceLayout(event.device.configuration_value)
        self.phase = Phase.URB

    def _check_devid(self, devid: int, error: type[ProtocolError]) -> None:
        assert self.imported is not None
        if devid != self.imported.devid:
            raise error(f"URB for devid {devid:#x}, but {self.imported.devid:#x} was imported")

    def _check_new_seqnum(self, seqnum: int, error: type[ProtocolError]) -> None:
        if seqnum in self.pending or seqnum in self._unlinks:
            raise error(f"seqnum {seqnum} is already in flight")
        if len(self.pending) + len(self._unlinks) >= self.limits.max_pending_urbs:
            raise error(f"more than {self.limits.max_pending_urbs} URBs in flight")

    def _submit(
        self, event: CmdSubmit, error: type[ProtocolError], header_checked: bool
    ) -> PendingUrb:
        self._check_devid(event.devid, error)
        self._check_new_seqnum(event.seqnum, error)
        if not header_checked:
            reason, _ = self.submit_header_error(
                event.ep,
                event.direction,
                event.number_of_packets,
                event.transfer_flags,
                event.transfer_buffer_length,
            )
            if reason is not None:
                raise error(reason)
        kind = self.layout.transfer_type(event.ep, event.direction)
        assert kind is not None
        iso = kind is _ISO
        np = event.number_of_packets
        if iso:
            if len(event.iso_packets) != np:
                raise error(f"isochronous URB needs {np} packet descriptors")
            for i, p in enumerate(event.iso_packets):
                if p.offset + p.length > event.transfer_buffer_length:
                    raise error(
                        f"ISO packet {i} ends at {p.offset + p.length}, past the "
                        f"{event.transfer_buffer_length}-byte buffer"
                    )
            # usbip_recv_iso: the packets' actual lengths must add up to the URB's
            # actual_length, which is 0 on a new URB; otherwise the stub drops the link.
            if any(p.actual_length for p in event.iso_packets):
                raise error("a CMD_SUBMIT's ISO packets report actual lengths")
        elif event.iso_packets:
            raise error("ISO packet descriptors on a non-isochronous URB")
        setup = Setup.decode(event.setup) if event.ep == 0 else None
        change = None if setup is None else layout_change(setup)
        if change is not None:
            self.layout.submitted(change)
        urb = PendingUrb(
            seqnum=event.seqnum,
            ep=event.ep,
            direction=event.direction,
            transfer_type=kind,
            iso=iso,
            transfer_buffer_length=event.transfer_buffer_length,
            number_of_packets=np if iso else 0,
            setup=setup,
            change=change,
        )
        self.pending[event.seqnum] = urb
        self._answered.pop(event.seqnum, None)
        return urb

    def _complete(self, event: RetSubmit, error: type[ProtocolError]) -> PendingUrb:
        urb = self.pending.pop(event.seqnum, None) or self._answered.pop(event.seqnum, None)
        if urb is None:
            raise error(f"RET_SUBMIT for seqnum {event.seqnum}, which is not pending")
        reason = self.reply_header_error(urb, event.actual_length, event.number_of_packets)
        if reason is not None:
            raise error(reason)
        expected = event.actual_length if urb.direction == _IN else 0
        if len(event.data) != expected and not (event.cut_through and not event.data):
            raise error(f"RET_SUBMIT {urb.direction.name} carries {expected} data bytes")
        if urb.iso:
            np = event.number_of_packets
            if len(event.iso_packets) != np:
                raise error(f"RET_SUBMIT needs {np} ISO packet descriptors")
            # vhci moves each packet's data to buffer + offset (usbip_pad_iso).
            for i, p in enumerate(event.iso_packets):
                if not 0 <= p.actual_length <= p.length or (
                    p.offset + p.actual_length > urb.transfer_buffer_length
                ):
                    raise error(
                        f"ISO packet {i} reports {p.actual_length} bytes at offset {p.offset}, "
                        f"outside its {p.length} bytes or the "
                        f"{urb.transfer_buffer_length}-byte buffer"
                    )
            # usbip_recv_iso checks the sum in both directions whenever packets follow.
            if np and sum(p.actual_length for p in event.iso_packets) != event.actual_length:
                raise error("ISO packet lengths do not add up to actual_length")
        elif event.iso_packets:
            raise error("ISO packet descriptors on a non-isochronous URB")
        if urb.setup is not None:
            self.layout.control_completed(urb.setup, event.status, event.data)
        if urb.change is not None:
            self._layout_settled(urb.change, event.status)
        return urb

    def _layout_settled(self, change: LayoutChange, status: int) -> None:
        self.layout.completed(change, status)
        if self.confirm_layout is not None:
            # The stub carried the change out before answering: its host now knows.
            seen = self.confirm_layout()
            if seen is not None:
                self.layout.confirm(*seen)

    def _unlink(self, event: CmdUnlink, error: type[ProtocolError]) -> PendingUrb | None:
        self._check_devid(event.devid, error)
        self._check_new_seqnum(event.seqnum, error)
        self._unlinks[event.seqnum] = event.unlink_seqnum
        urb = self.pending.get(event.unlink_seqnum)
        if urb is not None:
            urb.unlinked = True
        return urb

    def _unlinked(self, event: RetUnlink) -> PendingUrb | None:
        # An unknown RET_UNLINK is ignored, as vhci does.
        target = self._unlinks.pop(event.seqnum, None)
        urb = None if target is None else self.pending.pop(target, None)
        if urb is not None and event.status == 0:
            # usbip-host answers an unlink it carried out with RET_UNLINK alone, and
            # one it could not ("not found") with status 0. Then a RET_SUBMIT may still
            # follow, legitimately:
            # - vhci can send CMD_UNLINK before the CMD_SUBMIT it targets (its tx thread
            #   sends the unlink list after the submit list, and both can fill between
            #   passes): the server answers "not found" and then runs the URB;
            # - usbip-host can send the RET_UNLINK(0) of a URB that completed just
            #   before ahead of that URB's RET_SUBMIT (its tx thread's two lists again).
            # Whether one comes depends on timing a relay cannot see, and two relays in
            # series see CMDs and RETs interleaved differently: keep the URB to
            # recognise that one late RET_SUBMIT.
            self._answered[urb.seqnum] = urb
            if len(self._answered) > self.limits.max_pending_urbs:
                del self._answered[next(iter(self._answered))]
        return urb
