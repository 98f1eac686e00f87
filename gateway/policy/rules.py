"""A parsed rule: a target and the conditions a (client, device) pair must all meet."""

from __future__ import annotations

from dataclasses import dataclass

from .conditions import Condition, Side, Target
from .facts import ClientFacts, DeviceFacts


@dataclass(frozen=True, slots=True)
class Rule:
    target: Target
    conditions: tuple[Condition, ...]
    line: int
    text: str  # the rule as written, comments and continuations removed
    label: str | None = None  # USBGuard's `label`: for people, never matched

    def first_failure(
        self, client: ClientFacts, device: DeviceFacts
    ) -> tuple[Condition, str] | None:
        """The first condition that does not hold and why, or None when the rule matches."""
        for condition in self.conditions:
            why = condition.failure(condition.values(client, device))
            if why is not None:
                return condition, why
        return None

    def matches(self, client: ClientFacts, device: DeviceFacts) -> bool:
        return self.first_failure(client, device) is None

    def matches_early(self, client: ClientFacts, busid: str) -> bool | None:
        """Three-valued: True or False when client and bus id settle it, None when not.

        Device facts other than the bus id are unknown here (not missing): a condition
        on them is unknown, and False AND unknown is still False.
        """
        result: bool | None = True
        for condition in self.conditions:
            side = condition.attribute.side
            if side is Side.CLIENT:
                holds: bool | None = condition.holds(condition.values(client, _NO_DEVICE))
            elif side is Side.BUSID:
                holds = condition.holds((busid,) if busid else ())
            else:
                holds = None
            if holds is False:
                return False
            if holds is None:
                result = None
        return result


# Client conditions never read the device; this stands in for it.
_NO_DEVICE = DeviceFacts(busid="", vendor_id=0, product_id=0)
