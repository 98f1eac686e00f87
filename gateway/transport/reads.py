"""Reading from a stream: how much to ask for at once, and up to a connection's next event."""

from __future__ import annotations

import trio

from gateway.protocol import Connection, Event, NeedData

#: Bytes asked of a stream per read: a few large URBs, or many small ones, per call.
RECEIVE_SIZE = 256 * 1024


async def next_event(
    stream: trio.abc.ReceiveStream, conn: Connection, size: int = RECEIVE_SIZE
) -> Event:
    """`conn`'s next event, reading `stream` until there is one (ConnectionClosed at EOF)."""
    while True:
        event = conn.next_event()
        if not isinstance(event, NeedData):
            return event
        conn.receive_data(await stream.receive_some(size))
