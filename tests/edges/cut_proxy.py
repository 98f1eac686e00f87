"""A TCP relay whose link can be cut and restored, as a flaky uplink or a NAT that forgets.

Cut: every byte is swallowed silently (no FIN, no RST), on open connections and on new
ones, as when a cable is pulled or a router reboots and loses its translation table.
Restored: new connections pass again; the ones open during the cut stay dead.
"""

from __future__ import annotations

from functools import partial

import trio

from gateway.config import Address


class CutProxy:
    def __init__(self, target: Address) -> None:
        self.target = target
        self.up = True
        self.address = Address("127.0.0.1", 0)
        self.connections = 0
        self._generation = 0

    async def serve(self, *, task_status: trio.TaskStatus[Address]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.up = False
        self._generation += 1  # the connections open now never carry a byte again

    def restore(self) -> None:
        self.up = True

    async def _handle(self, near: trio.SocketStream) -> None:
        self.connections += 1
        generation = self._generation
        if not self.up:
            await _swallow(near)
            return
        try:
            far = await trio.open_tcp_stream(self.target.host, self.target.port)
        except OSError:
            await near.aclose()
            return
        alive = partial(self._alive, generation)
        async with far, near, trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, near, far, alive, nursery.cancel_scope)
            nursery.start_soon(_pipe, far, near, alive, nursery.cancel_scope)

    def _alive(self, generation: int) -> bool:
        return self.up and generation == self._generation


async def _swallow(stream: trio.SocketStream) -> None:
    with trio.move_on_after(60):
        while await stream.receive_some(65536):
            pass


async def _pipe(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    alive: partial[bool],
    scope: trio.CancelScope,
) -> None:
    try:
        while data := await source.receive_some(65536):
            if alive():
                await sink.send_all(data)
            else:
                await _swallow(source)  # dead link: nothing passes, nothing closes
                break
        else:
            await sink.send_eof()
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()
