"""A queue of byte chunks that URB handlers wait on: data behind a pending IN URB."""

from __future__ import annotations

from collections import deque

import trio


class ChunkFifo:
    """Chunks kept whole (one OUT transfer, one HID report) unless a reader asks for less.

    Cancel-safe for unlinks: a waiter whose URB is unlinked after it was woken but
    before it ran takes nothing, so no data is lost with a cancelled URB.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # bytes; None is unbounded
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        """Bytes buffered."""
        return self._size

    @property
    def chunks(self) -> int:
        return len(self._chunks)

    def _full(self, incoming: int) -> bool:
        # An empty queue takes any chunk, however big, so nothing can wait forever.
        return (
            self.capacity is not None and self._size > 0 and self._size + incoming > self.capacity
        )

    def put_nowait(self, data: bytes) -> None:
        if self._full(len(data)):
            raise trio.WouldBlock
        self._chunks.append(data)
        self._size += len(data)
        self._readable.unpark_all()

    async def put(self, data: bytes) -> None:
        while self._full(len(data)):
            await self._writable.park()
            await trio.lowlevel.checkpoint_if_cancelled()
        self.put_nowait(data)

    async def get(self, max_bytes: int) -> bytes:
        """The oldest chunk, or its first `max_bytes` (the rest stays at the front)."""
        while not self._chunks:
            await self._readable.park()
            await trio.lowlevel.checkpoint_if_cancelled()
        chunk = self._chunks[0]
        if len(chunk) > max_bytes:
            self._chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        else:
            self._chunks.popleft()
        self._size -= len(chunk)
        self._writable.unpark_all()
        return chunk

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
        self._writable.unpark_all()
