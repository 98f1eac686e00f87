"""Access control in the server gateway: the live policy, device facts, decisions, audit.

The policy file is reloaded atomically (a bad file keeps the old policy). Device facts
come from DEVLIST records (the client's own lists, or one the gateway asks usbipd for)
plus serial/manufacturer/product strings from sysfs. Every decision is audited.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog
from gateway.facts import StringSource
from gateway.policy import ClientFacts, Decision, DeviceFacts, Policy, PolicyError, Target
from gateway.protocol import DeviceInfo, ExportedDevice, InterfaceInfo, OpStatus
from gateway.reloading import FileSignatures
from gateway.transport.identity import PeerIdentity

log = logging.getLogger("gateway.access")

# What a refused IMPORT is answered with. `reject` must look exactly like a device that
# is not there, which current usbipd answers with NODEV; `block` is a plain failure
# ("Request Failed" in `usbip attach`).
REFUSAL_STATUS = {Target.BLOCK: OpStatus.NA, Target.REJECT: OpStatus.NODEV}

ALLOW_ALL_TEXT = "default allow\n"


class PolicyFile:
    """The policy in force and the file it came from; `reload` swaps it atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.generation = 0
        self.files = FileSignatures([path])
        if path is None:
            self.policy = Policy.parse(ALLOW_ALL_TEXT, "<no policy: every client allowed>")
        else:
            self.policy = self._read()
        self.generation = 1

    def _read(self) -> Policy:
        assert self.path is not None
        # Whatever happens next, this version of the file has been judged: a broken one
        # is reported once, not again at every poll until it is fixed.
        self.files.changed()
        text = self.path.read_text(encoding="utf-8")
        return Policy.parse(text, str(self.path))

    def reload(self) -> bool:
        """True if a new policy is in force; False (logged) if the old one stays."""
        if self.path is None:
            return False
        try:
            policy = self._read()
        except (OSError, UnicodeDecodeError, PolicyError) as exc:
            log.error("policy reload failed, keeping generation %d: %s", self.generation, exc)
            return False
        self.policy = policy
        self.generation += 1
        log.info("policy reloaded from %s (generation %d)", self.path, self.generation)
        return True


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    device: DeviceFacts | None

    @property
    def allowed(self) -> bool:
        return self.decision.target is Target.ALLOW

    @property
    def refusal(self) -> OpStatus:
        return REFUSAL_STATUS.get(self.decision.target, OpStatus.NODEV)


def device_summary(device: DeviceFacts | None, busid: str) -> dict[str, Any]:
    if device is None:
        return {"busid": busid}
    return {
        "busid": device.busid,
        "id": f"{device.vendor_id:04x}:{device.product_id:04x}",
        "serial": device.serial,
    }


def rule_summary(decision: Decision) -> str:
    return (
        "default" if decision.rule is None else f"line {decision.rule.line}: {decision.rule.text}"
    )


class AccessControl:
    def __init__(
        self,
        policy: PolicyFile,
        strings: StringSource,
        audit: AuditLog,
        list_upstream: Callable[[], Awaitable[Sequence[ExportedDevice]]],
        on_decision: Callable[[Target], None] | None = None,
    ) -> None:
        self.policy = policy
        self.strings = strings
        self.audit = audit
        self._list_upstream = list_upstream
        self._on_decision = on_decision
        self._known: dict[str, ExportedDevice] = {}  # by bus id, from every DEVLIST seen

    def facts(self, device: ExportedDevice) -> DeviceFacts:
        return self._facts(device.info, device.interfaces)

    def _facts(self, info: DeviceInfo, interfaces: Sequence[InterfaceInfo]) -> DeviceFacts:
        strings = self.strings.strings(info.busid)
        return DeviceFacts.from_record(
            info,
            tuple(interfaces),
            serial=strings.serial,
            manufacturer=strings.manufacturer,
            product=strings.product,
        )

    def learn(self, devices: Sequence[ExportedDevice]) -> None:
        for device in devices:
            self._known[device.info.busid] = device

    def _decided(
        self,
        decision: Decision,
        *,
        identity: PeerIdentity,
        address: str,
        request: str,
        busid: str,
        device: DeviceFacts | None,
    ) -> Verdict:
        if self._on_decision is not None:
            self._on_decision(decision.target)
        self.audit.record(
            "decision",
            request=request,
            client=identity.as_dict(),
            address=address,
            device=device_summary(device, busid),
            decision=decision.target.name.lower(),
            rule=rule_summary(decision),
            policy_generation=self.policy.generation,
        )
        return Verdict(decision, device)

    def visible(
        self, identity: PeerIdentity, address: str, devices: Sequence[ExportedDevice]
    ) -> tuple[ExportedDevice, ...]:
        """The DEVLIST entries this client may see: allowed and blocked ones."""
        self.learn(devices)
        client = ClientFacts.from_identity(identity)
        policy = self.policy.policy
        shown = []
        for exported in devices:
            facts = self.facts(exported)
            verdict = self._decided(
                policy.decide(client, facts),
                identity=identity,
                address=address,
                request="devlist",
                busid=exported.info.busid,
                device=facts,
            )
            if verdict.decision.target is not Target.REJECT:
                shown.append(exported)
        return tuple(shown)

    async def judge_import(self, identity: PeerIdentity, address: str, busid: str) -> Verdict:
        """Decide an IMPORT; asks usbipd for a DEVLIST only when the facts matter."""
        client = ClientFacts.from_identity(identity)
        policy = self.policy.policy
        where: dict[str, Any] = {
            "identity": identity,
            "address": address,
            "request": "import",
            "busid": busid,
        }
        early = policy.decide_early(client, busid)
        if early is not None:
            return self._decided(early, **where, device=None)
        exported = self._known.get(busid)
        if exported is None:
            self.learn(await self._list_upstream())
            exported = self._known.get(busid)
        if exported is None:
            # Not exported (or in use and never listed): nothing to decide on, so the
            # answer is the one for a device that does not exist.
            decision = Decision(Target.REJECT, None, f"bus id {busid} is not exported")
            return self._decided(decision, **where, device=None)
        facts = self.facts(exported)
        decision = policy.decide(client, facts)
        return self._decided(decision, **where, device=facts)

    def recheck(self, identity: PeerIdentity, device: DeviceFacts) -> Decision:
        """The current policy's word on a session already attached."""
        return self.policy.policy.decide(ClientFacts.from_identity(identity), device)

    def imported_facts(self, info: DeviceInfo) -> DeviceFacts:
        """Facts from an IMPORT reply's record, with interfaces from the last DEVLIST."""
        known = self._known.get(info.busid)
        interfaces = known.interfaces if known is not None and known.info == info else ()
        return self._facts(info, interfaces)
