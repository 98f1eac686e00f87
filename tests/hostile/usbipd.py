"""A scripted usbipd for the server gateway to talk to: healthy connections are passed
through to the real simulator, the others run a script that misbehaves."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from gateway.config import Address
from gateway.protocol import OpCode, RetSubmit, Setup
from gateway.protocol.constants import OP_HEADER, URB_HEADER_SIZE, Direction, UrbCommand
from gateway.protocol.descriptors import DESC_CONFIGURATION, GET_DESCRIPTOR, SET_CONFIGURATION

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class Tracker:
    """Counts running handlers; `idle()` returns once none is left."""

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self._idle = trio.Event()
        self._idle.set()

    def wrap(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def tracked(stream: Any) -> None:
            if not self.active:
                self._idle = trio.Event()
            self.active += 1
            self.total += 1
            try:
                await handler(stream)
            finally:
                self.active -= 1
                if not self.active:
                    self._idle.set()

        return tracked

    async def idle(self) -> None:
        await self._idle.wait()


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


async def read_request(stream: trio.SocketStream) -> bytes:
    head = await read_exactly(stream, OP_HEADER.size)
    code = OP_HEADER.unpack(head)[1]
    return head + (await read_exactly(stream, 32) if code == OpCode.REQ_IMPORT else b"")


def requested_busid(request: bytes) -> str | None:
    if len(request) < 40:
        return None
    return request[8:40].split(b"\0", 1)[0].decode()


async def answer_enumeration(stream: trio.abc.Stream, config: bytes) -> None:
    """Answer what usbcore asks first, as a device would: GET_DESCRIPTOR(configuration)
    with `config` (cut to wLength), then SET_CONFIGURATION with status 0, so that the
    gateways learn the device's endpoints. Returns once SET_CONFIGURATION is answered;
    anything else fails the test (the hostile scripts misbehave only after this)."""
    while True:
        cmd = await read_exactly(stream, URB_HEADER_SIZE)
        command, seqnum, _, direction, ep = struct.unpack(">IIIII", cmd[:20])
        setup = Setup.decode(cmd[40:48])
        if command != UrbCommand.CMD_SUBMIT or ep != 0:
            raise AssertionError(f"not an enumeration request: {cmd.hex()}")
        if (
            direction == Direction.IN
            and setup.request == GET_DESCRIPTOR
            and setup.value == DESC_CONFIGURATION << 8
        ):
            data = config[: setup.length]
            await stream.send_all(RetSubmit(seqnum, 0, len(data), data=data).encode())
        elif (
            direction == Direction.OUT
            and setup.request_type == 0x00
            and setup.request == SET_CONFIGURATION
            and setup.value == config[5]
            and setup.length == 0
        ):
            await stream.send_all(RetSubmit(seqnum, 0, 0).encode())
            return
        else:
            raise AssertionError(f"unexpected request during enumeration: {setup}")


async def drain_until_closed(stream: trio.abc.ReceiveStream) -> None:
    """Read (and ignore) until the gateway closes its end."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(65536):
            pass


def reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@dataclass
class FakeUsbipd:
    """Listens on loopback; imports of `passthrough` bus ids go to the simulator."""

    sim: Address
    passthrough: frozenset[str] = frozenset({"1-1", "1-2", "1-3"})
    script: Script | None = None
    tracker: Tracker = field(default_factory=Tracker)
    address: Address | None = None
    scripted: int = 0

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = Address(host, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(trio.serve_listeners, self.tracker.wrap(self._handle), listeners)
            )
            task_status.started(self.address)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            request = await read_request(stream)
        except (EOFError, trio.BrokenResourceError):
            await trio.aclose_forcefully(stream)
            return
        if requested_busid(request) in self.passthrough or self.script is None:
            await self._passthrough(stream, request)
            return
        self.scripted += 1
        try:
            await self.script(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _passthrough(self, client: trio.SocketStream, request: bytes) -> None:
        upstream = await trio.open_tcp_stream(self.sim.host, self.sim.port)
        async with client, upstream:
            await upstream.send_all(request)

            async def copy(
                source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, scope: trio.CancelScope
            ) -> None:
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await source.receive_some(256 * 1024):
                        await sink.send_all(data)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, client, upstream, nursery.cancel_scope)
                nursery.start_soon(copy, upstream, client, nursery.cancel_scope)
