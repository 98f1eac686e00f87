"""Access control in the server gateway: the live policy, device facts, decisions, audit.

The policy file is reloaded atomically (a bad file keeps the old policy). Device facts
come from DEVLIST records plus serial/manufacturer/product strings from sysfs: for a
DEVLIST, the reply being filtered; for an IMPORT, a listing the gateway asks usbipd for
at that moment, never an earlier one (the bus id may hold another device by now). Every
decision is audited and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.edges.audit import AuditLog
from gateway.edges.device_facts import StringSource
from gateway.edges.reloading import FileSignatures
from gateway.policy import ClientFacts, Decision, DeviceFacts, Policy, PolicyError, Target
from gateway.policy.shorthand import SOURCE as SHORTHAND_SOURCE
from gateway.protocol import DeviceInfo, ExportedDevice, InterfaceInfo, OpStatus
from gateway.transport.identity import PeerIdentity

log = logging.getLogger("gateway.edges.access")

# What a refused IMPORT is answered with. `reject` must look exactly like a device that
# is not there, which current usbipd answers with NODEV; `block` is a plain failure
# ("Request Failed" in `usbip attach`).
REFUSAL_STATUS = {Target.BLOCK: OpStatus.NA, Target.REJECT: OpStatus.NODEV}

ALLOW_ALL_TEXT = "default allow\n"

Request = Literal["devlist", "import"]


class PolicyFile:
    """The policy in force and the file it came from; `reload` swaps it atomically."""

    def __init__(self, path: Path | None, rules: str = "") -> None:
        """`rules`: without a file, the rules of the --allow-* shorthands (if any)."""
        self.path = path
        self.generation = 0
        self.files = FileSignatures([path])
        if path is None and rules:
            self.policy = Policy.parse(rules, SHORTHAND_SOURCE)
        elif path is None:
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

    def reload(self, path: Path | None = None) -> bool:
        """True if a new policy is in force; False (logged) if the old one stays. `path`:
        read another file from now on (its path changed in the configuration)."""
        if path is not None and path != self.path:
            return self._move(path)
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

    def _move(self, path: Path) -> bool:
        try:
            policy = Policy.parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError, PolicyError) as exc:
            log.error(
                "policy from %s failed, keeping %s (generation %d): %s",
                path,
                self.path or "no policy",
                self.generation,
                exc,
            )
            return False
        self.path = path
        self.files.retarget([path])
        self.policy = policy
        self.generation += 1
        log.info("policy now from %s (generation %d)", path, self.generation)
        return True


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    device: DeviceFacts | None
    # The record of the fresh listing the decision was made on; the IMPORT reply must
    # carry the same one. None: the device was not listed (decided without it).
    listed: DeviceInfo | None = None

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
        on_decision: Callable[[Request, bool, str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.strings = strings
        self.audit = audit
        self._list_upstream = list_upstream
        self._on_decision = on_decision  # (request, allowed, bus id): for metrics

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

    def _decided(
        self,
        decision: Decision,
        *,
        identity: PeerIdentity,
        address: str,
        request: Request,
        busid: str,
        device: DeviceFacts | None,
        listed: DeviceInfo | None = None,
    ) -> Verdict:
        if self._on_decision is not None:
            self._on_decision(request, decision.target is Target.ALLOW, busid)
        self.audit.record(
            "decision",
            request=request,
            client=identity.as_dict(),
            address=address,
            device=device_summary(device, busid),
            decision=decision.target.name.lower(),
            rule=rule_summary(decision),
            reason=decision.reason,
            policy_generation=self.policy.generation,
        )
        return Verdict(decision, device, listed)

    def visible(
        self, identity: PeerIdentity, address: str, devices: Sequence[ExportedDevice]
    ) -> tuple[ExportedDevice, ...]:
        """The DEVLIST entries this client may see: allowed and blocked ones."""
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
        """Decide an IMPORT on the device as usbipd lists it now.

        Only a decision the client and bus id alone settle for good is made without
        asking usbipd: a refusal is then the same whether the device exists or not.
        """
        client = ClientFacts.from_identity(identity)
        policy = self.policy.policy
        where: dict[str, Any] = {
            "identity": identity,
            "address": address,
            "request": "import",
            "busid": busid,
        }
        early = policy.decide_early(client, busid)
        if early is not None and (not early.allowed or self.policy.path is None):
            # A refusal, or an allowance no reload can ever take back: the device's
            # facts would change nothing.
            return self._decided(early, **where, device=None)
        # Asked even when allowed by bus id: a policy reload judges the session again on
        # the device's own facts, and the IMPORT reply is checked against this record.
        listed = next((d for d in await self._list_upstream() if d.info.busid == busid), None)
        if listed is None:
            if early is not None:
                # Allowed whatever is there; usbipd answers for what is not (in use, gone).
                return self._decided(early, **where, device=None)
            # Not exported (or in use): nothing to decide on, so the answer is the one
            # for a device that does not exist.
            decision = Decision(Target.REJECT, None, f"bus id {busid} is not exported")
            return self._decided(decision, **where, device=None)
        facts = self.facts(listed)
        decision = early if early is not None else policy.decide(client, facts)
        return self._decided(decision, **where, device=facts, listed=listed.info)

    def changed_device(
        self, identity: PeerIdentity, address: str, verdict: Verdict, imported: DeviceInfo
    ) -> Verdict:
        """An IMPORT reply whose record is not the one the decision was made on: the
        bus id holds another device (or the same one re-enumerated). Refused, audited."""
        decision = Decision(
            Target.REJECT,
            None,
            f"the device at bus id {imported.busid} changed between the listing and the import",
        )
        log.warning(
            "refusing the import of %s by %s: %s (listed %s, imported %s)",
            imported.busid,
            identity,
            decision.reason,
            verdict.listed,
            imported,
        )
        return self._decided(
            decision,
            identity=identity,
            address=address,
            request="import",
            busid=imported.busid,
            device=self._facts(imported, ()),
        )

    def record_facts(self, info: DeviceInfo) -> DeviceFacts:
        """Facts from an IMPORT reply's record alone (it carries no interfaces)."""
        return self._facts(info, ())

    def recheck(self, identity: PeerIdentity, device: DeviceFacts) -> Decision:
        """The current policy's word on a session already attached."""
        return self.policy.policy.decide(ClientFacts.from_identity(identity), device)
