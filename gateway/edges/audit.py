"""The audit log: one JSON object per line, per access decision and per session end.

`record` never waits: lines go through a bounded in-memory queue to a writer task that
does the file I/O in a worker thread, so a slow disk cannot stall a relay. If the
queue is full the record is dropped and counted (and the drop is itself logged).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

import trio

log = logging.getLogger("gateway.edges.audit")

QUEUE_SIZE = 10_000


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class AuditLog:
    """`destination`: a file path (appended to), "-" for stdout, or None for nowhere."""

    def __init__(self, destination: str | Path | None, queue_size: int = QUEUE_SIZE) -> None:
        self.destination = destination
        self._send, self._receive = trio.open_memory_channel[str](queue_size)
        self.written = 0
        self.dropped = 0
        self.finished = trio.Event()  # set when the writer has written all and stopped

    @property
    def enabled(self) -> bool:
        return self.destination is not None

    def record(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"time": utc_now(), "event": event, **fields}, default=str)
        try:
            self._send.send_nowait(line)
        except trio.ClosedResourceError:
            self.dropped += 1  # after close(): the gateway is stopping
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit queue full: %d records dropped so far", self.dropped)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task; run it in the gateway's nursery."""
        if not self.enabled:
            task_status.started()
            self.finished.set()
            return
        stream = await trio.to_thread.run_sync(self._open)
        task_status.started()
        try:
            async with self._receive:
                async for first in self._receive:
                    batch = [first]
                    while True:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await trio.to_thread.run_sync(_write, stream, batch)
                    self.written += len(batch)
        finally:
            if stream is not sys.stdout:
                stream.close()
            self.finished.set()

    def _open(self) -> IO[str]:
        if self.destination == "-":
            return sys.stdout
        assert self.destination is not None
        return Path(self.destination).open("a", encoding="utf-8")

    def close(self) -> None:
        """No more records; the writer drains the queue and ends."""
        self._send.close()


def _write(stream: IO[str], lines: list[str]) -> None:
    stream.write("\n".join(lines) + "\n")
    stream.flush()
