"""Attributes, set operators and the conditions a rule is made of.

Notation for the semantics: P is the list of values a condition names (patterns, possibly
with wildcards), D the fact's values (one for single-valued attributes, several for
`with-interface`, `client-uri`, `client-dns`), and p ~ d means pattern p matches value d.
An empty D is a missing fact, and a condition on a missing fact never holds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .facts import ClientFacts, DeviceFacts
from .patterns import Pattern, Value, render


class Target(enum.Enum):
    ALLOW = "allow"  # listed and importable
    BLOCK = "block"  # listed, import refused
    REJECT = "reject"  # not listed; import answered as if the device did not exist


class Operator(enum.Enum):
    ALL_OF = "all-of"  # every p in P matches some d in D
    ONE_OF = "one-of"  # some p in P matches some d in D
    NONE_OF = "none-of"  # no p in P matches any d in D
    EQUALS = "equals"  # all-of, and every d in D is matched by some p in P
    EQUALS_ORDERED = "equals-ordered"  # |P| = |D| and P[i] ~ D[i] for every i
    MATCH_ALL = "match-all"  # every d in D is matched by some p in P (D within P)


class Side(enum.Enum):
    CLIENT = "client"
    DEVICE = "device"
    BUSID = "busid"  # a device fact, but known before the device's record is fetched


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    side: Side
    noun: str  # for messages: "device has no serial"
    # What a value written without braces means: USBGuard's `equals` for device facts;
    # for certificate facts, "any of the certificate's values matches".
    single: Operator
    client: Callable[[ClientFacts], tuple[Value, ...]] | None = None
    device: Callable[[DeviceFacts], tuple[Value, ...]] | None = None


def _opt(value: str | int | None) -> tuple[Value, ...]:
    return () if value is None or value == "" else (value,)


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "id",
            Side.DEVICE,
            "vendor:product id",
            Operator.EQUALS,
            device=lambda d: ((d.vendor_id, d.product_id),),
        ),
        Attribute(
            "serial", Side.DEVICE, "serial", Operator.EQUALS, device=lambda d: _opt(d.serial)
        ),
        Attribute(
            "name", Side.DEVICE, "product name", Operator.EQUALS, device=lambda d: _opt(d.product)
        ),
        Attribute(
            "manufacturer",
            Side.DEVICE,
            "manufacturer",
            Operator.EQUALS,
            device=lambda d: _opt(d.manufacturer),
        ),
        Attribute("busid", Side.BUSID, "bus id", Operator.EQUALS, device=lambda d: _opt(d.busid)),
        Attribute(
            "class",
            Side.DEVICE,
            "device class",
            Operator.EQUALS,
            device=lambda d: _opt(d.device_class),
        ),
        Attribute(
            "with-interface",
            Side.DEVICE,
            "interfaces",
            Operator.EQUALS,
            device=lambda d: d.interfaces,
        ),
        Attribute(
            "client-cn",
            Side.CLIENT,
            "common name",
            Operator.ONE_OF,
            client=lambda c: _opt(c.common_name),
        ),
        Attribute("client-uri", Side.CLIENT, "URI", Operator.ONE_OF, client=lambda c: c.uris),
        Attribute(
            "client-dns", Side.CLIENT, "DNS name", Operator.ONE_OF, client=lambda c: c.dns_names
        ),
    )
}
# USBGuard's name for the port a device hangs off; here it is the USB/IP bus id.
ATTRIBUTES["via-port"] = ATTRIBUTES["busid"]


def _listed(values: tuple[Value, ...]) -> str:
    if len(values) == 1:
        return render(values[0])
    return "{ " + " ".join(render(v) for v in values) + " }"


@dataclass(frozen=True, slots=True)
class Condition:
    """One attribute test of a rule, e.g. `with-interface one-of { 08:*:* }`."""

    attribute: Attribute
    operator: Operator
    patterns: tuple[Pattern, ...]
    text: str  # as written (tokens joined by single spaces)
    line: int  # where the attribute name is (a continued rule spans lines)
    column: int

    def values(self, client: ClientFacts, device: DeviceFacts) -> tuple[Value, ...]:
        if self.attribute.client is not None:
            return self.attribute.client(client)
        assert self.attribute.device is not None
        return self.attribute.device(device)

    def holds(self, values: tuple[Value, ...]) -> bool:
        return self.failure(values) is None

    def failure(self, values: tuple[Value, ...]) -> str | None:
        """None when the condition holds for these values, else why not (reads after `text`)."""
        if not values:
            owner = "certificate" if self.attribute.side is Side.CLIENT else "device"
            return f"cannot match: {owner} has no {self.attribute.noun}"
        op, patterns = self.operator, self.patterns
        if op is Operator.EQUALS_ORDERED:
            if len(patterns) != len(values):
                return (
                    f"does not match {_listed(values)}: {len(values)} values, "
                    f"the rule lists {len(patterns)}"
                )
            for index, (pattern, value) in enumerate(zip(patterns, values, strict=True), 1):
                if not pattern.matches(value):
                    return (
                        f"fails: {render(value)} (position {index}) does not match {pattern.text}"
                    )
            return None
        if op is Operator.ONE_OF:
            if any(p.matches(v) for p in patterns for v in values):
                return None
            return f"does not match {_listed(values)}"
        if op is Operator.NONE_OF:
            for pattern in patterns:
                for value in values:
                    if pattern.matches(value):
                        return f"fails: {render(value)} matches {pattern.text}"
            return None
        if op in (Operator.ALL_OF, Operator.EQUALS):
            for pattern in patterns:
                if not any(pattern.matches(v) for v in values):
                    if len(patterns) == 1:
                        return f"does not match {_listed(values)}"
                    return f"fails: {pattern.text} matches nothing in {_listed(values)}"
        if op in (Operator.MATCH_ALL, Operator.EQUALS):
            for value in values:
                if not any(p.matches(value) for p in patterns):
                    if len(patterns) == 1 and len(values) == 1:
                        return f"does not match {_listed(values)}"
                    return f"fails: {render(value)} is not matched by any listed value"
        return None
