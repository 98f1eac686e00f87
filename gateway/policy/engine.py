"""The policy: ordered rules, first match wins, then the default. Pure: no I/O, no clock."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .conditions import Condition, Target
from .facts import ClientFacts, DeviceFacts
from .parser import parse
from .rules import Rule


@dataclass(frozen=True, slots=True)
class Decision:
    target: Target
    rule: Rule | None  # None when the default decided
    reason: str  # short, for logs

    @property
    def allowed(self) -> bool:
        return self.target is Target.ALLOW

    @property
    def listed(self) -> bool:
        """Whether the device appears in this client's DEVLIST."""
        return self.target is not Target.REJECT


@dataclass(frozen=True, slots=True)
class Step:
    """How one rule fared: matched, or the first condition that failed and why."""

    rule: Rule
    failed: Condition | None
    why: str | None

    @property
    def matched(self) -> bool:
        return self.failed is None

    def __str__(self) -> str:
        if self.failed is None:
            return f"line {self.rule.line}: matches: {self.rule.text}"
        return f"line {self.rule.line}: {self.failed.text} {self.why}"


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    steps: tuple[Step, ...]  # every rule up to and including the deciding one
    client: ClientFacts
    device: DeviceFacts

    def __str__(self) -> str:
        lines = [f"client: {self.client.to_spec()}", f"device: {self.device.to_spec()}"]
        lines.extend(str(step) for step in self.steps)
        if not self.steps:
            lines.append("(no rules)")
        lines.append(f"decision: {self.decision.target.value} ({self.decision.reason})")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    default: Target = Target.REJECT
    default_line: int | None = None  # None: no `default` line, the implicit reject
    source: str = "<policy>"

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> Policy:
        """Parse a rules file; raises PolicyError with line and column."""
        parsed = parse(text, source)
        return cls(
            parsed.rules,
            parsed.default or Target.REJECT,
            parsed.default_line,
            source,
        )

    def _by_rule(self, rule: Rule) -> Decision:
        return Decision(rule.target, rule, f"{self.source}:{rule.line}")

    def _by_default(self) -> Decision:
        if self.default_line is None:
            reason = "no rule matched, implicit default"
        else:
            reason = f"no rule matched, default at {self.source}:{self.default_line}"
        return Decision(self.default, None, reason)

    def decide(self, client: ClientFacts, device: DeviceFacts) -> Decision:
        for rule in self.rules:
            if rule.matches(client, device):
                return self._by_rule(rule)
        return self._by_default()

    def decide_early(self, client: ClientFacts, busid: str) -> Decision | None:
        """The decision if the client and bus id alone settle it, else None.

        Whenever this returns a Decision, `decide` agrees for every device with that bus
        id, so an IMPORT can be answered without asking usbipd for the device.
        """
        for rule in self.rules:
            matched = rule.matches_early(client, busid)
            if matched is None:
                return None
            if matched:
                return self._by_rule(rule)
        return self._by_default()

    def explain(self, client: ClientFacts, device: DeviceFacts) -> Explanation:
        steps: list[Step] = []
        decision = self._by_default()
        for rule in self.rules:
            failure = rule.first_failure(client, device)
            if failure is None:
                steps.append(Step(rule, None, None))
                decision = self._by_rule(rule)
                break
            steps.append(Step(rule, *failure))
        return Explanation(decision, tuple(steps), client, device)

    def target_counts(self) -> dict[Target, int]:
        """Rules per target, every target present (zero when unused)."""
        counts = Counter(rule.target for rule in self.rules)
        return {target: counts[target] for target in Target}

    def summary(self) -> str:
        """For logs: `5 rules, default reject`."""
        noun = "rule" if len(self.rules) == 1 else "rules"
        return f"{len(self.rules)} {noun}, default {self.default.value}"
