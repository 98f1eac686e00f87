"""The HTTP endpoint's open connections, and which one gives way when there are too many.

Refusing new connections at the limit would let a few dozen silent TCP connections
starve /healthz (and a liveness probe would then restart the gateway). Instead the table
never refuses: at the limit it closes the oldest connection that is not answering a
request, so the newest, a probe's, is served.
"""

from __future__ import annotations

import trio


class Slot:
    """One open connection: its cancel scope, whether it is answering a request, and
    whether it is already closing (lingering after its last answer: evicting it then is
    no loss worth counting)."""

    __slots__ = ("answering", "closing", "evicted", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.answering = False
        self.closing = False
        self.evicted = False


class ConnectionTable:
    """At most `limit` open connections, oldest first."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"connection limit {limit} is not positive")
        self.limit = limit
        self._open: dict[Slot, None] = {}  # insertion order is age order

    def __len__(self) -> int:
        return len(self._open)

    def admit(self) -> Slot:
        """A slot for a new connection. At the limit, the oldest connection waiting for a
        request (idle, or its head still arriving) is cancelled to make room; if every
        one is answering, the oldest of those (each answer is bounded by the write
        timeout, but a flood of them must not lock out a probe either)."""
        while len(self._open) >= self.limit:
            victim = next((s for s in self._open if not s.answering), None)
            if victim is None:
                victim = next(iter(self._open))
            self.release(victim)
            victim.evicted = True
            victim.scope.cancel()
        slot = Slot()
        self._open[slot] = None
        return slot

    def release(self, slot: Slot) -> None:
        self._open.pop(slot, None)
