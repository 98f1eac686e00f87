"""One memory budget for the partial frames all sessions of a gateway hold.

A frame is forwarded only once it is whole, so each session's reader may hold up to a
transfer (16 MiB by default) per direction; a thousand sessions would hold gigabytes.
The budget caps their sum. A read that would take it past the cap ends its own session
with a clear error instead of pausing: a paused session may be waiting for the very bytes
that would let another finish its frame, so pausing could deadlock; refusing cannot.
"""

from __future__ import annotations

import threading


class OverBudget(Exception):
    """A session's partial frames would take the gateway past `max_buffered_bytes`."""


class BufferBudget:
    """The bytes held by every reader together; shared by Trio tasks and relay threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self._total

    def adjust(self, delta: int) -> bool:
        with self._lock:
            if delta > 0 and self._total + delta > self.limit:
                return False
            self._total += delta
            return True

    def holding(self) -> Holding:
        return Holding(self)


class Holding:
    """What one reader holds against the budget (one direction of one session)."""

    def __init__(self, budget: BufferBudget) -> None:
        self._budget = budget
        self.held = 0

    def update(self, held: int) -> None:
        """The reader now holds `held` bytes; OverBudget if the growth does not fit."""
        delta = held - self.held
        if delta == 0:  # the common case, whole frames: no lock taken
            return
        if not self._budget.adjust(delta):
            raise OverBudget(
                f"{held} bytes of partial frames would take the gateway past "
                f"limits.max_buffered_bytes ({self._budget.limit}) with all sessions"
            )
        self.held = held

    def release(self) -> None:
        self._budget.adjust(-self.held)
        self.held = 0
