"""The simulated usbipd + usbip-host: op exchange, then URBs to the imported device.

Each connection is one task reading frames and one task writing them. URBs are
queued per endpoint, each endpoint served by its own task in submission order (as a
host controller does), so a pending IN on one endpoint never holds up another, and
every URB in flight has its own cancel scope for CMD_UNLINK.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from ..config import Address
from ..edges.device_facts import DeviceStrings, publish_sysfs
from ..protocol import (
    DEFAULT_PORT,
    ECONNRESET,
    CmdSubmit,
    CmdUnlink,
    Connection,
    ConnectionClosed,
    Direction,
    Event,
    Limits,
    NeedData,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    ProtocolError,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
    Role,
)
from ..transport.reads import RECEIVE_SIZE
from .catalog import make_devices
from .device import SimDevice
from .urb import EPROTO, Urb, UrbResult

log = logging.getLogger("gateway.sim")

# Stop reading new URBs while this much reply data waits for a slow reader.
OUTBOX_HIGH_WATER = 4 * 1024 * 1024

_CONNECTION_LOST = (trio.BrokenResourceError, trio.ClosedResourceError)


class SimServer:
    """Devices, who has which, and counters tests can assert on."""

    def __init__(self, devices: Iterable[SimDevice], *, limits: Limits | None = None) -> None:
        self.devices: dict[str, SimDevice] = {}
        devids: set[int] = set()
        for device in devices:
            devid = device.info().devid
            if device.busid in self.devices or devid in devids:
                raise ValueError(f"two devices share bus id {device.busid} or devid {devid:#x}")
            self.devices[device.busid] = device
            devids.add(devid)
        self.limits = limits
        self.listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        self.connections_accepted = 0
        self.connections_active = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.imports = 0
        self.protocol_errors = 0
        self._in_use: set[str] = set()

    def in_use(self, busid: str) -> bool:
        return busid in self._in_use

    def strings(self, busid: str) -> DeviceStrings:
        """Serial, manufacturer and product, as sysfs gives them for real devices."""
        device = self.devices.get(busid)
        if device is None:
            return DeviceStrings()
        return DeviceStrings(device.serial, device.manufacturer, device.product)

    def publish_sysfs(self, root: Path) -> None:
        """Write the devices' strings and endpoint layout in sysfs's layout, for a server
        gateway's `policy.sysfs` (kept current as configurations and alt settings change)."""
        for busid, device in self.devices.items():
            publish_sysfs(root, busid, self.strings(busid))
            device.publish_layout(root)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each TCP listener, e.g. to learn the port when it was 0."""
        found = []
        for listener in self.listeners:
            if isinstance(listener, trio.SocketListener):
                host, port = listener.socket.getsockname()[:2]
                found.append((host, port))
        return found

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[SimServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.listeners = list(listeners)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_stream, self.listeners)
            for host, port in self.addresses:
                log.info("listening on %s", Address(host, port))
            task_status.started(self)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends; never raises for the peer's mistakes."""
        self.connections_accepted += 1
        self.connections_active += 1
        if isinstance(stream, trio.SocketStream):
            # trio sets this already; stated because USB/IP is unusable with Nagle.
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        try:
            async with stream:
                try:
                    await self._converse(stream, Connection(Role.SERVER, self.limits))
                except ProtocolError as exc:
                    self.protocol_errors += 1
                    log.warning("protocol error, closing the connection: %s", exc)
                except _CONNECTION_LOST as exc:
                    log.info("connection lost: %r", exc)
        finally:
            self.connections_active -= 1

    async def _receive(self, stream: trio.abc.Stream, conn: Connection) -> None:
        data = await stream.receive_some(RECEIVE_SIZE)
        self.bytes_received += len(data)
        conn.receive_data(data)

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        await stream.send_all(data)
        self.bytes_sent += len(data)

    async def _converse(self, stream: trio.abc.Stream, conn: Connection) -> None:
        while True:
            event = conn.next_event()
            if not isinstance(event, NeedData):
                break
            await self._receive(stream, conn)
        if isinstance(event, OpRequestDevlist):
            # Like current usbipd, devices in use are not offered.
            free = tuple(d.exported() for b, d in self.devices.items() if b not in self._in_use)
            await self._send(stream, conn.send(OpReplyDevlist(free)))
        elif isinstance(event, OpRequestImport):
            await self._import(stream, conn, event.busid)
        elif not isinstance(event, ConnectionClosed):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} in the op phase")

    async def _import(self, stream: trio.abc.Stream, conn: Connection, busid: str) -> None:
        device = self.devices.get(busid)
        if device is None or busid in self._in_use:
            status = OpStatus.NODEV if device is None else OpStatus.DEV_BUSY
            log.info("refused import of %s: %s", busid, status.name)
            await self._send(stream, conn.send(OpReplyImport(status)))
            return
        # Claimed before the first await, so two imports cannot both win.
        self._in_use.add(busid)
        try:
            device.reset()
            await self._send(stream, conn.send(OpReplyImport(OpStatus.OK, device.info())))
            # Like usbip-host, the simulator frames URBs by its own device's endpoints.
            conn.state.layout.load(device.parsed_configurations(), device.configuration, {})
            conn.state.confirm_layout = device.layout_state
            self.imports += 1
            log.info("imported %s", busid)
            await _UrbSession(self, device, stream, conn).run()
        finally:
            device.reset()
            self._in_use.discard(busid)
            log.info("released %s", busid)


@dataclass(eq=False, slots=True)
class _InFlight:
    urb: Urb
    scope: trio.CancelScope | None = None
    finished: bool = False  # completed or unlinked: exactly one reply was queued


class _UrbSession:
    def __init__(
        self, server: SimServer, device: SimDevice, stream: trio.abc.Stream, conn: Connection
    ) -> None:
        self._server = server
        self._device = device
        self._stream = stream
        self._conn = conn
        self._in_flight: dict[int, _InFlight] = {}
        self._last_submit: int | None = None  # the newest CMD_SUBMIT's seqnum
        self._early_unlinks: dict[int, int] = {}  # target seqnum -> CMD_UNLINK seqnum
        self._queues: dict[int, trio.MemorySendChannel[_InFlight]] = {}
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        self._outbox_ready = trio.lowlevel.ParkingLot()
        self._outbox_room = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guarded, self._write_loop)
            await self._guarded(self._read_loop)
        # The peer is gone: whatever was pending dies with the connection.

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        assert self._nursery is not None
        try:
            await loop()
        except ProtocolError as exc:
            self._server.protocol_errors += 1
            log.warning("%s: protocol error, closing the connection: %s", self._device.busid, exc)
        except _CONNECTION_LOST as exc:
            log.info("%s: connection lost: %r", self._device.busid, exc)
        finally:
            self._nursery.cancel_scope.cancel()

    # -- reading

    async def _read_loop(self) -> None:
        conn = self._conn
        while True:
            while self._outbox_size > OUTBOX_HIGH_WATER:
                await self._outbox_room.park()
            event = conn.next_event()
            if isinstance(event, NeedData):
                await self._server._receive(self._stream, conn)
            elif isinstance(event, CmdSubmit):
                self._submit(event)
            elif isinstance(event, CmdUnlink):
                self._unlink(event)
            elif isinstance(event, ConnectionClosed):
                return
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} in the URB phase")

    def _submit(self, cmd: CmdSubmit) -> None:
        self._last_submit = cmd.seqnum
        if self._early_unlinks and self._answer_early_unlinks(cmd.seqnum):
            return
        entry = _InFlight(Urb.from_submit(cmd))
        self._in_flight[cmd.seqnum] = entry
        # Control transfers share ep0 whatever their direction.
        key = 0 if cmd.ep == 0 else entry.urb.address
        queue = self._queues.get(key)
        if queue is None:
            assert self._nursery is not None
            queue, receive = trio.open_memory_channel[_InFlight](math.inf)
            self._queues[key] = queue
            self._nursery.start_soon(self._endpoint_worker, receive)
        queue.send_nowait(entry)

    def _unlink(self, cmd: CmdUnlink) -> None:
        entry = self._in_flight.pop(cmd.unlink_seqnum, None)
        if entry is None:
            if _is_after(cmd.unlink_seqnum, self._last_submit):
                # vhci's tx thread can send an unlink before the submit it targets.
                # usbip-host answers "not found" and runs the URB, and vhci, having
                # given the URB back on that answer, drops the connection at its
                # RET_SUBMIT. Wait for the submit and cancel it instead.
                self._early_unlinks[cmd.unlink_seqnum] = cmd.seqnum
                return
            # Already completed (its RET_SUBMIT is queued or sent), or never existed.
            self._emit(RetUnlink(cmd.seqnum, 0))
            return
        entry.finished = True
        if entry.scope is not None:
            entry.scope.cancel()
        self._emit(RetUnlink(cmd.seqnum, -ECONNRESET))

    def _answer_early_unlinks(self, seqnum: int) -> bool:
        """Answer the early unlinks `seqnum` settles; True if it targets this URB."""
        cancelled = self._early_unlinks.pop(seqnum, None)
        if cancelled is not None:
            self._emit(RetUnlink(cancelled, -ECONNRESET))
        # Submits arrive in seqnum order: a target older than this one never will.
        for target in [t for t in self._early_unlinks if not _is_after(t, seqnum)]:
            self._emit(RetUnlink(self._early_unlinks.pop(target), 0))
        return cancelled is not None

    # -- completing

    async def _endpoint_worker(self, receive: trio.MemoryReceiveChannel[_InFlight]) -> None:
        async for entry in receive:
            if entry.finished:
                continue  # unlinked while queued
            result: UrbResult | None = None
            with trio.CancelScope() as entry.scope:
                try:
                    result = await self._device.submit(entry.urb)
                except Exception:
                    log.exception(
                        "%s: device failed on seqnum %d", self._device.busid, entry.urb.seqnum
                    )
                    result = UrbResult(status=-EPROTO)
            # No checkpoint from here on: an unlink cannot slip between check and reply.
            if result is not None and not entry.finished:
                self._complete(entry, result)

    def _complete(self, entry: _InFlight, result: UrbResult) -> None:
        entry.finished = True
        urb = entry.urb
        del self._in_flight[urb.seqnum]
        if urb.direction == Direction.IN:
            data = result.data
            actual = len(data)
        elif result.actual_length is not None:
            data, actual = b"", result.actual_length
        else:
            data, actual = b"", urb.length if result.status == 0 else 0
        self._emit(
            RetSubmit(
                seqnum=urb.seqnum,
                status=result.status,
                actual_length=min(actual, urb.length),
                start_frame=result.start_frame,
                number_of_packets=len(result.iso_packets) if urb.is_iso else urb.number_of_packets,
                error_count=result.error_count,
                data=data,
                iso_packets=result.iso_packets if urb.is_iso else (),
            )
        )

    # -- writing: one writer, so replies leave in the order they were decided

    def _emit(self, event: Event) -> None:
        data = self._conn.send(event)
        self._outbox.append(data)
        self._outbox_size += len(data)
        self._outbox_ready.unpark_all()

    async def _write_loop(self) -> None:
        while True:
            while not self._outbox:
                await self._outbox_ready.park()
            chunks, self._outbox = self._outbox, []
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            await self._server._send(self._stream, data)
            self._outbox_size -= len(data)
            self._outbox_room.unpark_all()


def _is_after(seqnum: int, reference: int | None) -> bool:
    """Whether `seqnum` is newer than `reference` (serial arithmetic: seqnums wrap)."""
    if reference is None:
        return True
    return 0 < (seqnum - reference) % 2**32 < 2**31


async def serve_sim(
    devices: Iterable[SimDevice] | SimServer | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[SimServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve simulated devices (all of them by default) on `listeners`, or on TCP
    `host`:`port`. `nursery.start(serve_sim, ...)` returns the SimServer once it listens."""
    if isinstance(devices, SimServer):
        server = devices
    else:
        server = SimServer(make_devices() if devices is None else devices)
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    await server.serve(listeners, task_status=task_status)
