"""What a simulated device is asked to do, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import CmdSubmit, Direction, IsoPacket, Setup

# Completion statuses are negative errno values, as the kernel stub sends them.
EPIPE = 32  # a STALL
EPROTO = 71
ECONNRESET = 104
EREMOTEIO = 121  # a short IN transfer with URB_SHORT_NOT_OK

# transfer_flags bits (include/linux/usb.h)
URB_SHORT_NOT_OK = 0x0001


@dataclass(frozen=True, slots=True)
class Urb:
    """One CMD_SUBMIT as a device sees it."""

    seqnum: int
    ep: int
    direction: Direction
    length: int  # transfer_buffer_length
    data: bytes = b""  # OUT data
    setup: Setup | None = None  # control transfers only
    transfer_flags: int = 0
    start_frame: int = 0
    interval: int = 0
    # As received: 0 or 0xffffffff on non-ISO URBs; echoed in the RET_SUBMIT.
    number_of_packets: int = 0
    iso_packets: tuple[IsoPacket, ...] = ()

    @classmethod
    def from_submit(cls, cmd: CmdSubmit) -> Urb:
        return cls(
            seqnum=cmd.seqnum,
            ep=cmd.ep,
            direction=cmd.direction,
            length=cmd.transfer_buffer_length,
            data=cmd.data,
            setup=Setup.decode(cmd.setup) if cmd.ep == 0 else None,
            transfer_flags=cmd.transfer_flags,
            start_frame=cmd.start_frame,
            interval=cmd.interval,
            number_of_packets=cmd.number_of_packets,
            iso_packets=cmd.iso_packets,
        )

    @property
    def address(self) -> int:
        """The endpoint address: number, with bit 7 set for IN."""
        return self.ep | (0x80 if self.direction == Direction.IN else 0)

    @property
    def is_iso(self) -> bool:
        # The codec parsed descriptors exactly when the URB is isochronous.
        return bool(self.iso_packets)


@dataclass(frozen=True, slots=True)
class UrbResult:
    """A completion. IN: `data` (ISO IN: packed). OUT: `actual_length` bytes taken."""

    status: int = 0
    data: bytes = b""
    actual_length: int | None = None  # OUT only; None means all on success, 0 on error
    iso_packets: tuple[IsoPacket, ...] = ()
    start_frame: int = 0
    error_count: int = 0


STALL = UrbResult(status=-EPIPE)
