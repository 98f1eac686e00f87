"""Byte streams to events and back, without any I/O.

`Connection` is one endpoint (a simulator, a load generator, a test client): bytes from
its peer in, events out; events in, bytes out. `Splice` is a relay's view: bytes from
both ends in, each frame out as an event together with its exact bytes, so a relay
forwards frames unchanged and still knows what every one of them means.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import (
    ISO_DESCRIPTOR,
    OP_HEADER,
    URB_HEADER_SIZE,
    USBIP_VERSION,
    Direction,
    OpCode,
    OpStatus,
    UrbCommand,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    CMD_SUBMIT_HEADER,
    CMD_UNLINK_HEADER,
    RET_SUBMIT_HEADER,
    RET_UNLINK_HEADER,
    CmdSubmit,
    CmdUnlink,
    ConnectionClosed,
    Event,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    Payload,
    RetSubmit,
    RetUnlink,
)
from .records import (
    DEVICE_RECORD_SIZE,
    INTERFACE_RECORD_SIZE,
    DeviceInfo,
    ExportedDevice,
    InterfaceInfo,
    decode_cstring,
)
from .state import Limits, PendingUrb, Phase, ProtocolState, Role

_U32 = struct.Struct(">I")
_DIRECTIONS = (Direction.OUT, Direction.IN)
# Enum members the per-URB path compares with, as plain names (see protocol.state).
_CLIENT, _URB, _ERROR = Role.CLIENT, Phase.URB, Phase.ERROR
_OUT, _IN = _DIRECTIONS
_CMD_SUBMIT, _CMD_UNLINK = UrbCommand.CMD_SUBMIT, UrbCommand.CMD_UNLINK
_RET_SUBMIT, _RET_UNLINK = UrbCommand.RET_SUBMIT, UrbCommand.RET_UNLINK
_BUSID_END = OP_HEADER.size + 32


class NeedData:
    """Returned when no whole message is buffered yet (a sentinel, like h11's)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(slots=True)  # not frozen: one is made per frame, and frozen fields cost
class Frame:
    """One message as a relay sees it: what it means, its exact bytes, its URB.

    With cut-through, a bulk or interrupt URB's data is not copied into its event (whose
    `cut_through` is set): `raw` holds the header and the data read so far, and the rest
    comes as `Payload` frames as it arrives. `raw` may then be a view of what was received.
    """

    event: Event | Payload
    raw: bytes | memoryview
    urb: PendingUrb | None = None


PAYLOAD: Final = Payload()


def _iso_packets(buf: bytes | bytearray, offset: int, count: int) -> tuple[IsoPacket, ...]:
    unpack = ISO_DESCRIPTOR.unpack_from
    size = ISO_DESCRIPTOR.size
    return tuple(IsoPacket(*unpack(buf, offset + i * size)) for i in range(count))


def _view(buf: bytes | bytearray, start: int, end: int) -> bytes | memoryview:
    """Like `_take`, without copying out of an immutable buffer."""
    if type(buf) is bytes:
        return buf if start == 0 and end == len(buf) else memoryview(buf)[start:end]
    return _take(buf, start, end)


def _take(buf: bytes | bytearray, start: int, end: int) -> bytes:
    if start == end:
        return b""
    if start == 0 and end == len(buf) and type(buf) is bytes:
        return buf  # a whole received chunk: no copy
    with memoryview(buf) as view:
        return view[start:end].tobytes()


class _Reader:
    """Buffers one direction's bytes and cuts whole messages off its front.

    Messages are read at an offset (`_pos`) rather than cut off the buffer one by one;
    the consumed front is dropped once per `feed`. A chunk that arrives when nothing is
    pending becomes the buffer as it is, so a message that fills it is taken uncopied.
    """

    def __init__(self, sender: Role, *, cut_through: bool = False) -> None:
        self.sender = sender
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        self._need = 1  # bytes past `_pos` to wait for before trying again; a hint only
        self._cut_through = cut_through
        self.follows = 0  # data bytes of a cut-through frame still to come
        self._parse_urb = self._parse_cmd if sender is Role.CLIENT else self._parse_ret

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
        elif self._pos >= len(self._buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        else:
            buf = self._buf
            if isinstance(buf, bytearray):
                if self._pos:
                    del buf[: self._pos]
            else:
                buf = bytearray(memoryview(buf)[self._pos :])
            buf += data
            self._buf = buf
            self._pos = 0

    def _compact(self) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._pos = 0

    def payload(self, state: ProtocolState) -> Frame | NeedData:
        """The next piece of a cut-through frame's data (`follows` > 0)."""
        if state.phase is _ERROR:
            raise RemoteProtocolError("the connection already failed")
        start = self._pos
        end = min(len(self._buf), start + self.follows)
        if end > start:
            self._pos = end
            self.follows -= end - start
            return Frame(PAYLOAD, _view(self._buf, start, end))
        if self._eof:
            state.phase = _ERROR
            raise RemoteProtocolError(
                f"the {self.sender.value} closed the connection mid-message "
                f"({self.follows} bytes of data to come)"
            )
        return NEED_DATA

    def next(
        self, state: ProtocolState, keep_raw: bool
    ) -> tuple[Event, bytes | memoryview, PendingUrb | None] | NeedData:
        if state.phase is _ERROR:
            raise RemoteProtocolError("the connection already failed")
        if len(self._buf) - self._pos >= self._need:
            # The URB phase goes straight to its parser: this runs for every frame.
            parsed = self._parse_urb(state) if state.phase is _URB else self._parse(state)
            if parsed is not None:
                event, end = parsed
                start = self._pos  # after `_parse`, which may have compacted the buffer
                raw = _view(self._buf, start, end) if keep_raw else b""
                # A CMD_SUBMIT read here passed `submit_header_error` in `_parse_cmd`.
                urb = state.apply(self.sender, event, RemoteProtocolError, header_checked=True)
                # Only once it passed: a refused frame stays unconsumed, never passed on.
                self._pos = end
                self._need = 1
                return event, raw, urb
        if self._eof:
            left = len(self._buf) - self._pos
            if left:
                state.phase = _ERROR
                raise RemoteProtocolError(
                    f"the {self.sender.value} closed the connection mid-message "
                    f"({left} bytes unparsed)"
                )
            return ConnectionClosed(), b"", None
        return NEED_DATA

    def _parse(self, state: ProtocolState) -> tuple[Event, int] | None:
        phase = state.phase
        client = self.sender is Role.CLIENT
        if phase is Phase.URB:
            return self._parse_cmd(state) if client else self._parse_ret(state)
        self._compact()  # the op phase reads from the front
        if phase is Phase.OP_REQUEST and client:
            return self._parse_request()
        if phase is Phase.DEVLIST_REPLY and not client:
            return self._parse_devlist_reply(state)
        if phase is Phase.IMPORT_REPLY and not client:
            return self._parse_import_reply()
        if phase is Phase.ERROR:
            raise RemoteProtocolError("the connection already failed")
        state.phase = Phase.ERROR
        raise RemoteProtocolError(
            f"the {self.sender.value} sent {self.buffered} bytes in phase {phase.value}, "
            "where it has nothing to say"
        )

    # -- op phase

    def _op_header(self, expect: tuple[OpCode, ...]) -> tuple[int, int] | None:
        buf = self._buf
        if len(buf) < OP_HEADER.size:
            self._need = OP_HEADER.size
            return None
        version, code, status = OP_HEADER.unpack_from(buf)
        if version != USBIP_VERSION:
            raise RemoteProtocolError(f"USB/IP version {version:#06x} is not {USBIP_VERSION:#06x}")
        if code not in expect:
            names = " or ".join(c.name for c in expect)
            raise RemoteProtocolError(f"op code {code:#06x} where {names} was expected")
        return code, status

    def _parse_request(self) -> tuple[Event, int] | None:
        head = self._op_header((OpCode.REQ_DEVLIST, OpCode.REQ_IMPORT))
        if head is None:
            return None
        code, status = head
        if status != 0:
            raise RemoteProtocolError(f"op request with non-zero status {status}")
        if code == OpCode.REQ_DEVLIST:
            return OpRequestDevlist(), OP_HEADER.size
        if len(self._buf) < _BUSID_END:
            self._need = _BUSID_END
            return None
        busid = decode_cstring(bytes(self._buf[OP_HEADER.size : _BUSID_END]), "requested busid")
        try:
            return OpRequestImport(busid), _BUSID_END
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from exc

    def _parse_import_reply(self) -> tuple[Event, int] | None:
        head = self._op_header((OpCode.REP_IMPORT,))
        if head is None:
            return None
        status = head[1]
        if status != OpStatus.OK:
            return OpReplyImport(status), OP_HEADER.size
        end = OP_HEADER.size + DEVICE_RECORD_SIZE
        if len(self._buf) < end:
            self._need = end
            return None
        return OpReplyImport(status, DeviceInfo.decode(self._buf, OP_HEADER.size)), end

    def _parse_devlist_reply(self, state: ProtocolState) -> tuple[Event, int] | None:
        head = self._op_header((OpCode.REP_DEVLIST,))
        if head is None:
            return None
        status = head[1]
        if status != OpStatus.OK:
            return OpReplyDevlist(status=status), OP_HEADER.size
        buf = self._buf
        pos = OP_HEADER.size + _U32.size
        if len(buf) < pos:
            self._need = pos
            return None
        (count,) = _U32.unpack_from(buf, OP_HEADER.size)
        if count > state.limits.max_devices:
            raise RemoteProtocolError(
                f"DEVLIST reply lists {count} devices, over the limit of {state.limits.max_devices}"
            )
        devices = []
        for _ in range(count):
            if len(buf) < pos + DEVICE_RECORD_SIZE:
                self._need = pos + DEVICE_RECORD_SIZE
                return None
            info = DeviceInfo.decode(buf, pos)
            pos += DEVICE_RECORD_SIZE
            end = pos + INTERFACE_RECORD_SIZE * info.num_interfaces
            if len(buf) < end:
                self._need = end
                return None
            interfaces = tuple(
                InterfaceInfo.decode(buf, offset)
                for offset in range(pos, end, INTERFACE_RECORD_SIZE)
            )
            devices.append(ExportedDevice(info, interfaces))
            pos = end
        return OpReplyDevlist(tuple(devices)), pos

    # -- URB phase

    def _parse_cmd(self, state: ProtocolState) -> tuple[Event, int] | None:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < URB_HEADER_SIZE:
            self._need = URB_HEADER_SIZE
            return None
        command = _U32.unpack_from(buf, pos)[0]
        if command == _CMD_SUBMIT:
            (_, seqnum, devid, direction, ep, flags, length, start, np, interval, setup) = (
                CMD_SUBMIT_HEADER.unpack_from(buf, pos)
            )
            # Cut where usbip-host will: by the endpoint the device has, decided from
            # the header alone, before waiting for (or forwarding) any payload.
            reason, iso = state.submit_header_error(ep, direction, np, flags, length)
            if reason is not None:
                raise RemoteProtocolError(f"CMD_SUBMIT refused: {reason}")
            direction = _DIRECTIONS[direction]  # 0 or 1, checked above; an Enum call is slow
            data_end = pos + URB_HEADER_SIZE + (length if direction == _OUT else 0)
            end = data_end + (np * ISO_DESCRIPTOR.size if iso else 0)
            # Bulk and interrupt data is passed on as it arrives; what the gateway reads
            # (control requests, ISO descriptors) is waited for whole.
            cut = self._cut_through and direction == _OUT and not iso and ep != 0
            if cut:
                self.follows = max(0, end - len(buf))
                end = data_end = min(end, len(buf))
            elif len(buf) < end:
                self._need = end - pos
                return None
            try:
                event: Event = CmdSubmit(
                    seqnum=seqnum,
                    devid=devid,
                    direction=direction,
                    ep=ep,
                    transfer_buffer_length=length,
                    transfer_flags=flags,
                    start_frame=start,
                    number_of_packets=np,
                    interval=interval,
                    setup=setup,
                    data=b"" if cut else _take(buf, pos + URB_HEADER_SIZE, data_end),
                    iso_packets=_iso_packets(buf, data_end, np) if iso else (),
                    cut_through=cut,
                )
            except LocalProtocolError as exc:
                raise RemoteProtocolError(str(exc)) from exc
            return event, end
        if command == _CMD_UNLINK:
            _, seqnum, devid, direction, ep, unlink = CMD_UNLINK_HEADER.unpack_from(buf, pos)
            return CmdUnlink(seqnum, unlink, devid, direction, ep), pos + URB_HEADER_SIZE
        raise RemoteProtocolError(f"URB command {command} from the client (expected CMD_*)")

    def _parse_ret(self, state: ProtocolState) -> tuple[Event, int] | None:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < URB_HEADER_SIZE:
            self._need = URB_HEADER_SIZE
            return None
        command = _U32.unpack_from(buf, pos)[0]
        if command == _RET_SUBMIT:
            (_, seqnum, devid, direction, ep, status, actual, start, np, errors) = (
                RET_SUBMIT_HEADER.unpack_from(buf, pos)
            )
            urb = state.awaiting(seqnum)
            if urb is None:
                raise RemoteProtocolError(f"RET_SUBMIT for seqnum {seqnum}, which is not pending")
            reason = state.reply_header_error(urb, actual, np)
            if reason is not None:
                raise RemoteProtocolError(reason)
            data_end = pos + URB_HEADER_SIZE + (actual if urb.direction == _IN else 0)
            end = data_end + (np * ISO_DESCRIPTOR.size if urb.iso else 0)
            cut = self._cut_through and urb.direction == _IN and not urb.iso and urb.setup is None
            if cut:
                self.follows = max(0, end - len(buf))
                end = data_end = min(end, len(buf))
            elif len(buf) < end:
                self._need = end - pos
                return None
            try:
                event: Event = RetSubmit(
                    seqnum=seqnum,
                    status=status,
                    actual_length=actual,
                    start_frame=start,
                    number_of_packets=np,
                    error_count=errors,
                    data=b"" if cut else _take(buf, pos + URB_HEADER_SIZE, data_end),
                    iso_packets=_iso_packets(buf, data_end, np) if urb.iso else (),
                    devid=devid,
                    direction=direction,
                    ep=ep,
                    cut_through=cut,
                )
            except LocalProtocolError as exc:
                raise RemoteProtocolError(str(exc)) from exc
            return event, end
        if command == _RET_UNLINK:
            _, seqnum, devid, direction, ep, status = RET_UNLINK_HEADER.unpack_from(buf, pos)
            return RetUnlink(seqnum, status, devid, direction, ep), pos + URB_HEADER_SIZE
        raise RemoteProtocolError(f"URB command {command} from the server (expected RET_*)")


class Connection:
    """One end of a USB/IP connection, in the style of h11.Connection."""

    def __init__(self, our_role: Role, limits: Limits | None = None) -> None:
        self.our_role = our_role
        self.their_role = our_role.peer
        self._state = ProtocolState(limits)
        self._reader = _Reader(self.their_role)

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def state(self) -> ProtocolState:
        return self._state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; b"" means it closed its end."""
        self._reader.feed(data)

    def next_event(self) -> Event | NeedData:
        try:
            result = self._reader.next(self._state, False)
        except ProtocolError:
            self._state.phase = Phase.ERROR
            raise
        return result if isinstance(result, NeedData) else result[0]

    def send(self, event: Event) -> bytes:
        if isinstance(event, ConnectionClosed):
            return b""
        self._state.apply(self.our_role, event, LocalProtocolError)
        return event.encode()


class Splice:
    """A relay's view of one connection: both directions, one state.

    `cut_through`: a bulk or interrupt URB's data is passed on as it arrives, after its
    header was checked (see `Frame`), rather than held until the frame is whole.
    """

    def __init__(self, limits: Limits | None = None, *, cut_through: bool = False) -> None:
        self._state = ProtocolState(limits)
        # Two attributes, not a dict keyed by Role: an Enum's hash is Python code, and
        # this lookup happens twice per frame.
        self._client = _Reader(Role.CLIENT, cut_through=cut_through)
        self._server = _Reader(Role.SERVER, cut_through=cut_through)

    def _reader(self, sender: Role) -> _Reader:
        return self._client if sender is Role.CLIENT else self._server

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def state(self) -> ProtocolState:
        return self._state

    def buffered(self, sender: Role) -> int:
        return self._reader(sender).buffered

    def receive_data(self, sender: Role, data: bytes | bytearray | memoryview) -> None:
        (self._client if sender is _CLIENT else self._server).feed(data)

    def next_frame(self, sender: Role) -> Frame | NeedData:
        state = self._state
        reader = self._client if sender is _CLIENT else self._server
        try:
            if reader.follows:
                return reader.payload(state)
            result = reader.next(state, True)
        except ProtocolError:
            state.phase = _ERROR
            raise
        return result if isinstance(result, NeedData) else Frame(*result)

    def inject(self, sender: Role, event: Event) -> bytes:
        """A message the relay itself sends as if it came from `sender`, e.g. a refusal."""
        if isinstance(event, ConnectionClosed):
            raise LocalProtocolError("ConnectionClosed is not sent; close the stream")
        self._state.apply(sender, event, LocalProtocolError)
        return event.encode()

    def replace(self, frame: Frame, event: OpReplyDevlist) -> bytes:
        """Bytes for a DEVLIST reply in place of the one in `frame` (a filtered list).

        Only DEVLIST replies may be replaced: the state they lead to (DONE) does not
        depend on their content, unlike an IMPORT reply's.
        """
        if not isinstance(frame.event, OpReplyDevlist) or frame.event.status != event.status:
            raise LocalProtocolError("only a DEVLIST reply can be replaced, keeping its status")
        if len(event.devices) > len(frame.event.devices):
            raise LocalProtocolError("a replacement DEVLIST may only leave devices out")
        return event.encode()
