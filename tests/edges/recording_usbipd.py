"""A usbipd that records every byte the server gateway sends it and whose devices the
test changes at will, the listing and the IMPORT reply separately (a device replugged
between the two)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from gateway.config import Address
from gateway.protocol import (
    Connection,
    DeviceInfo,
    ExportedDevice,
    NeedData,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    Role,
)


@dataclass
class RecordingUsbipd:
    listing: tuple[ExportedDevice, ...] = ()  # the DEVLIST reply
    imports: dict[str, DeviceInfo] = field(default_factory=dict)  # IMPORT replies by bus id
    received: list[bytearray] = field(default_factory=list)  # per connection, in order
    handled: int = 0  # connections whose handler has finished
    _progress: trio.Event = field(default_factory=trio.Event)

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(Address(host, port))

    async def wait_handled(self, count: int) -> None:
        """Until `count` connections have ended (the gateway closed them)."""
        while self.handled < count:
            await self._progress.wait()

    def take(self) -> list[bytes]:
        """What each connection received since the last call."""
        taken = [bytes(r) for r in self.received]
        self.received.clear()
        return taken

    async def _handle(self, stream: trio.SocketStream) -> None:
        record = bytearray()
        self.received.append(record)
        conn = Connection(Role.SERVER)
        try:
            async with stream:
                while isinstance(event := conn.next_event(), NeedData):
                    data = await stream.receive_some(65536)
                    record += data
                    conn.receive_data(data)
                if isinstance(event, OpRequestDevlist):
                    await stream.send_all(conn.send(OpReplyDevlist(self.listing)))
                elif isinstance(event, OpRequestImport):
                    info = self.imports.get(event.busid)
                    if info is None:
                        await stream.send_all(conn.send(OpReplyImport(OpStatus.NODEV)))
                    else:
                        await stream.send_all(conn.send(OpReplyImport(OpStatus.OK, info)))
                        await _record_until_closed(stream, record)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.handled += 1
            self._progress.set()
            self._progress = trio.Event()


async def _record_until_closed(stream: trio.SocketStream, record: bytearray) -> None:
    """An imported device: whatever the gateway sends until it closes is recorded."""
    while data := await stream.receive_some(65536):
        record += data
