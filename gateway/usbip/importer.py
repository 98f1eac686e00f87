"""An async USB/IP importer over any Trio stream: list, import, and URBs in flight.

What `usbip list/attach` plus vhci-hcd do, in userspace: for the demo's self-check,
the tests, and the load generator. Many URBs may be in flight; each `submit` waits
for its own RET_SUBMIT (or RET_UNLINK).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import trio

from gateway.protocol import (
    CmdSubmit,
    CmdUnlink,
    Connection,
    ConnectionClosed,
    DeviceInfo,
    Direction,
    Event,
    ExportedDevice,
    Limits,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
)
from gateway.protocol.descriptors import GET_DESCRIPTOR, SET_CONFIGURATION, Setup
from gateway.transport.reads import next_event


class ImportRefused(Exception):
    def __init__(self, busid: str, status: int) -> None:
        try:
            name = OpStatus(status).name
        except ValueError:
            name = str(status)
        super().__init__(f"import of {busid} refused: {name}")
        self.status = status


class _Link:
    """A Connection bound to a stream."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits | None) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT, limits)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def next_event(self) -> Event:
        return await next_event(self.stream, self.conn)


async def list_devices(
    stream: trio.abc.Stream, limits: Limits | None = None
) -> tuple[ExportedDevice, ...]:
    """DEVLIST over a fresh connection, which it closes (the server does too)."""
    async with stream:
        link = _Link(stream, limits)
        await link.send(OpRequestDevlist())
        reply = await link.next_event()
    if not isinstance(reply, OpReplyDevlist):
        raise ConnectionError(f"no DEVLIST reply: {reply!r}")
    if reply.status != OpStatus.OK:
        raise ConnectionError(f"DEVLIST failed with status {reply.status}")
    return reply.devices


@dataclass(frozen=True, slots=True)
class Completion:
    """How a URB ended: its RET_SUBMIT, or the status of the RET_UNLINK that ended it."""

    ret: RetSubmit | None
    unlink_status: int | None = None

    @property
    def status(self) -> int:
        if self.ret is not None:
            return self.ret.status
        assert self.unlink_status is not None
        return self.unlink_status

    @property
    def data(self) -> bytes:
        return self.ret.data if self.ret is not None else b""


class ImportedDevice:
    """The URB phase of one imported device. Run `serve()` in a nursery while in use."""

    def __init__(self, link: _Link, device: DeviceInfo) -> None:
        self._link = link
        self.device = device
        self._seqnums = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Completion]]] = {}
        self._unlinks: dict[int, int] = {}
        self._send_lock = trio.Lock()
        self._sent: dict[int, trio.Event] = {}
        self.closed = trio.Event()

    async def serve(self) -> None:
        """Deliver completions until either end closes the connection."""
        try:
            while True:
                try:
                    event = await self._link.next_event()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, RetSubmit):
                    self._finish(event.seqnum, Completion(event))
                elif isinstance(event, RetUnlink):
                    target = self._unlinks.pop(event.seqnum, None)
                    if target is not None and target in self._waiting:
                        self._finish(target, Completion(None, event.status))
        finally:
            self.closed.set()
            for done, _ in self._waiting.values():
                done.set()

    def _finish(self, seqnum: int, completion: Completion) -> None:
        waiter = self._waiting.pop(seqnum, None)
        if waiter is not None:
            waiter[1].append(completion)
            waiter[0].set()

    def next_seqnum(self) -> int:
        return next(self._seqnums)

    async def submit(
        self,
        ep: int,
        direction: Direction,
        *,
        length: int = 0,
        data: bytes = b"",
        setup: bytes = bytes(8),
        seqnum: int | None = None,
    ) -> Completion:
        seqnum = self.next_seqnum() if seqnum is None else seqnum
        done, result = self._waiting[seqnum] = (trio.Event(), [])
        sent = self._sent.setdefault(seqnum, trio.Event())
        cmd = CmdSubmit(
            seqnum=seqnum,
            devid=self.device.devid,
            direction=direction,
            ep=ep,
            transfer_buffer_length=len(data) if direction == Direction.OUT else length,
            setup=setup,
            data=data,
        )
        async with self._send_lock:
            await self._link.send(cmd)
        sent.set()
        del self._sent[seqnum]
        await done.wait()
        if not result:
            raise ConnectionError(f"connection closed with URB {seqnum} in flight")
        return result[0]

    async def control(self, setup: Setup, data: bytes = b"") -> Completion:
        direction = Direction.IN if setup.is_in else Direction.OUT
        return await self.submit(0, direction, length=setup.length, data=data, setup=setup.encode())

    async def unlink(self, seqnum: int) -> None:
        """Ask for `seqnum` to be unlinked; its `submit` returns with the outcome."""
        unlink_seq = self.next_seqnum()
        self._unlinks[unlink_seq] = seqnum
        async with self._send_lock:
            await self._link.send(CmdUnlink(unlink_seq, seqnum, self.device.devid))

    async def sent(self, seqnum: int) -> None:
        """Wait until the CMD_SUBMIT for `seqnum` (being submitted elsewhere) is sent."""
        event = self._sent.setdefault(seqnum, trio.Event())
        if seqnum in self._waiting and seqnum not in self._sent:
            return
        await event.wait()

    def in_flight(self, seqnum: int) -> bool:
        return seqnum in self._waiting

    async def aclose(self) -> None:
        await self._link.stream.aclose()

    async def enumerate(self) -> None:
        """What usbcore does before any driver uses the device: read the first
        configuration's descriptors, then SET_CONFIGURATION. Relays on the way (and
        this end's codec) learn the endpoints from it. Run before `serve()`."""
        header = await self._control_now(Setup(0x80, GET_DESCRIPTOR, 0x0200, 0, 9))
        if header.status != 0 or len(header.data) < 9:
            raise ConnectionError(f"no configuration descriptor (status {header.status})")
        total = int.from_bytes(header.data[2:4], "little")
        whole = await self._control_now(Setup(0x80, GET_DESCRIPTOR, 0x0200, 0, total))
        if whole.status != 0 or len(whole.data) != total:
            raise ConnectionError(f"configuration descriptor short (status {whole.status})")
        done = await self._control_now(Setup(0x00, SET_CONFIGURATION, whole.data[5], 0, 0))
        if done.status != 0:
            raise ConnectionError(f"SET_CONFIGURATION failed with status {done.status}")

    async def _control_now(self, setup: Setup) -> RetSubmit:
        seqnum = self.next_seqnum()
        await self._link.send(
            CmdSubmit(
                seqnum=seqnum,
                devid=self.device.devid,
                direction=Direction.IN if setup.is_in else Direction.OUT,
                ep=0,
                transfer_buffer_length=setup.length,
                setup=setup.encode(),
            )
        )
        reply = await self._link.next_event()
        if not isinstance(reply, RetSubmit) or reply.seqnum != seqnum:
            raise ConnectionError(f"no answer to control request {setup}: {reply!r}")
        return reply


async def import_device(
    stream: trio.abc.Stream,
    busid: str,
    limits: Limits | None = None,
    *,
    enumerate: bool = True,
) -> ImportedDevice:
    """IMPORT `busid` (and, unless told otherwise, enumerate it); the stream then
    carries its URBs. Closed if the import fails."""
    link = _Link(stream, limits)
    try:
        await link.send(OpRequestImport(busid))
        reply = await link.next_event()
        if isinstance(reply, OpReplyImport) and reply.device is not None:
            device = ImportedDevice(link, reply.device)
            if enumerate:
                await device.enumerate()
            return device
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    await trio.aclose_forcefully(stream)
    if isinstance(reply, OpReplyImport):
        raise ImportRefused(busid, reply.status)
    raise ConnectionError(f"no IMPORT reply: {reply!r}")
