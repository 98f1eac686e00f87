"""Per-device access policy: a USBGuard-style rule language over client and device facts.

The engine is pure (no I/O, no clock); `gateway.edges.device_facts` reads the device
strings and `cli` is the `policy check` / `policy explain` command. The language is
described in docs/policy.md.
"""

from .conditions import Operator, Target
from .engine import Decision, Explanation, Policy, Step
from .errors import PolicyError, PolicyErrors
from .facts import ClientFacts, DeviceFacts
from .parser import parse_device_spec
from .rules import Rule

__all__ = [
    "ClientFacts",
    "Decision",
    "DeviceFacts",
    "Explanation",
    "Operator",
    "Policy",
    "PolicyError",
    "PolicyErrors",
    "Rule",
    "Step",
    "Target",
    "parse_device_spec",
]
