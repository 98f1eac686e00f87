"""A hostile USB/IP client for the real-kernel tests, and the kernel log it is judged by.

The client is authorised (a valid client certificate, or plain USB/IP straight to
usbipd for the control) and imports a device like any other, then sends CMD_SUBMITs that
usbip-host frames otherwise than their header suggests (docs/wire-framing.md S7, S10):
the bytes a careless relay would pass as payload or ISO descriptors are a complete
CMD_UNLINK header, which the kernel would read as its next command. Its seqnum is
distinctive (0xDEAD....), so usbip-host's receive debug log (``usbip_dump_header``)
shows whether it ever got there.

Headers are packed here by hand: the gateway's own codec would refuse to encode them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.protocol import Direction, UrbCommand
from gateway.protocol.descriptors import GET_DESCRIPTOR, Setup
from gateway.transport.tls import client_context
from gateway.usbip.importer import ImportedDevice, import_device

HEADER_SIZE = 48
_SUBMIT = struct.Struct(">IIIIIIiiIi8s")
_UNLINK = struct.Struct(">IIIIII24x")
_RET = struct.Struct(">IIIIIiiiIi8x")  # RET_SUBMIT; RET_UNLINK shares the first six


def submit_header(
    seqnum: int,
    devid: int,
    direction: Direction,
    ep: int,
    length: int,
    *,
    number_of_packets: int = 0,
    interval: int = 0,
    setup: bytes = bytes(8),
) -> bytes:
    flags = start_frame = 0
    return _SUBMIT.pack(
        UrbCommand.CMD_SUBMIT,
        *(seqnum, devid, direction, ep),
        *(flags, length, start_frame, number_of_packets, interval, setup),
    )


def unlink_header(seqnum: int, devid: int, unlink_seqnum: int) -> bytes:
    return _UNLINK.pack(UrbCommand.CMD_UNLINK, seqnum, devid, 0, 0, unlink_seqnum)


@dataclass(frozen=True)
class Attack:
    """One hostile stream: a CMD_SUBMIT whose tail is a hidden CMD_UNLINK header."""

    name: str
    submit_seqnum: int
    hidden_seqnum: int
    direction: Direction
    ep: int
    length: int
    number_of_packets: int = 0
    interval: int = 0

    @property
    def unlink_target(self) -> int:
        return 0x0BAD0000 | (self.hidden_seqnum & 0xFFFF)

    def stream(self, devid: int) -> bytes:
        head = submit_header(
            self.submit_seqnum,
            devid,
            self.direction,
            self.ep,
            self.length,
            number_of_packets=self.number_of_packets,
            interval=self.interval,
        )
        # It unlinks a seqnum never submitted: usbip-host only logs "not pending" (an
        # unlink of a live URB is where Debian's 6.1 stub is known to crash).
        hidden = unlink_header(self.hidden_seqnum, devid, self.unlink_target)
        assert len(hidden) == HEADER_SIZE
        return head + hidden


def absent_out_endpoint(name: str, hidden_seqnum: int, ep: int = 2) -> Attack:
    """(a) OUT to an endpoint the device lacks, 48 bytes of "payload": usbip-host reads
    the header only (get_pipe fails), so the payload is its next header."""
    seqnum = 0x5EC00000 | (hidden_seqnum & 0xFFFF)
    return Attack(name, seqnum, hidden_seqnum, Direction.OUT, ep, 48)


def iso_packets_on_interrupt(name: str, hidden_seqnum: int, ep: int = 1) -> Attack:
    """(b) IN to an interrupt endpoint claiming 3 ISO packets: usbip-host reads ISO
    descriptors only for isochronous pipes, so the 48 "descriptor" bytes are a header.
    (The interval must be positive, or usb_submit_urb refuses the interrupt URB and
    usbip-host drops the connection before it reads on.)"""
    seqnum = 0x5EC00000 | (hidden_seqnum & 0xFFFF)
    return Attack(name, seqnum, hidden_seqnum, Direction.IN, ep, 8, 3, interval=8)


class RawReader:
    """Whole headers (and IN data) from a stream, without the gateway's codec."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    async def read(self, n: int) -> bytes | None:
        """Exactly n bytes; None at end of stream (or a broken one)."""
        while len(self.buffer) < n:
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def reply(self) -> tuple[int, int, int, int] | None:
        """(command, seqnum, status, actual_length) of the next reply, its data read."""
        head = await self.read(HEADER_SIZE)
        if head is None:
            return None
        command, seqnum, _devid, direction, _ep, status, actual, _sf, _np, _ec = _RET.unpack(head)
        data_follows = command == UrbCommand.RET_SUBMIT and direction == Direction.IN
        if data_follows and actual > 0 and await self.read(actual) is None:
            return None
        return command, seqnum, status, actual

    async def drain(self) -> list[tuple[int, int, int, int]]:
        """Every reply until the other end closes."""
        replies = []
        while (reply := await self.reply()) is not None:
            replies.append(reply)
        return replies


@dataclass
class SessionReport:
    name: str
    busid: str
    devid: int = 0
    enumerated: bool = False
    forwarded: list[int] = field(default_factory=list)  # seqnums answered by RET_SUBMIT
    replies_after: list[tuple[int, int, int, int]] = field(default_factory=list)
    closed_by_peer: bool = False
    error: str | None = None


async def open_mtls(port: int, certs: Path, identity: str) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    ctx = client_context(certs / f"{identity}.pem", certs / f"{identity}.key", certs / "ca.pem")
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


ENUMERATION_SEQNUMS = (1, 2, 3)  # import_device's enumerate(): GET_DESCRIPTOR x2, SET_CONFIG


async def run_session(
    stream: trio.abc.Stream,
    name: str,
    busid: str,
    attack: Attack,
    *,
    enumerate: bool,
    hold: Callable[[], Awaitable[None]] | None = None,
) -> SessionReport:
    """Import `busid`, enumerate it (or, when not, ask once for the device descriptor on
    endpoint 0), send `attack`; then read until the peer closes (a gateway), or, given
    `hold` (usbipd keeps the connection and answers nothing), close when it returns."""
    report = SessionReport(name, busid)
    device: ImportedDevice | None = None
    try:
        device = await import_device(stream, busid, enumerate=enumerate)
        report.devid = device.device.devid
        reader = RawReader(stream)
        if enumerate:
            report.enumerated = True
            report.forwarded.extend(ENUMERATION_SEQNUMS)
        else:
            seqnum = device.next_seqnum()
            setup = Setup(0x80, GET_DESCRIPTOR, 0x0100, 0, 18).encode()
            await stream.send_all(
                submit_header(seqnum, report.devid, Direction.IN, 0, 18, setup=setup)
            )
            reply = await reader.reply()
            if reply is not None and reply[:2] == (UrbCommand.RET_SUBMIT, seqnum):
                report.forwarded.append(seqnum)
        await stream.send_all(attack.stream(report.devid))
        if hold is None:
            report.replies_after = await reader.drain()
            report.closed_by_peer = True
        else:
            await hold()
    except (OSError, ConnectionError, trio.BrokenResourceError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        await trio.aclose_forcefully(stream)
    return report


# ------------------------------------------------------------------ the kernel's log

DUMP = re.compile(r"BASE: cmd (\d+) seq (\d+) devid (\d+) dir (\d+) ep (\d+)")
KERNEL_FRAMING_ERRORS = ("CMD_SUBMIT: invalid epnum", "isoc invalid num packets")
MARK = "rk-hostile:"


@dataclass
class KernelSegment:
    """What usbip-host logged between `rk-hostile: begin NAME` and `... end NAME`."""

    lines: list[str] = field(default_factory=list)

    @property
    def headers(self) -> list[tuple[int, int]]:
        """(command, seqnum) of every header usbip-host read."""
        return [(int(m.group(1)), int(m.group(2))) for ln in self.lines if (m := DUMP.search(ln))]

    @property
    def framing_errors(self) -> list[str]:
        return [ln for ln in self.lines if any(e in ln for e in KERNEL_FRAMING_ERRORS)]


def kernel_segments(dmesg: str) -> dict[str, KernelSegment]:
    segments: dict[str, KernelSegment] = {}
    current: KernelSegment | None = None
    for line in dmesg.splitlines():
        if MARK in line:
            verb, _, name = line.split(MARK, 1)[1].strip().partition(" ")
            if verb == "begin":
                current = segments[name] = KernelSegment()
            elif verb == "end":
                current = None
            continue
        if current is not None:
            current.lines.append(line)
    return segments
