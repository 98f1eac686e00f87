"""A Node's resources and its one Sender or Receiver, kept consistent as they change:
a new device list bumps the Source (and the Sender's classes), an activation bumps the
Sender's or Receiver's subscription. Pure; `on_change` tells the registration what to
send again, `on_activate` the gateway what to do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import model
from .connection import Answer, Port
from .model import JSON, NodeFacts, UsbDevice

KINDS = ("node", "device", "source", "flow", "sender", "receiver")


class NodeState:
    def __init__(
        self,
        facts: NodeFacts,
        port: Port,
        *,
        on_change: Callable[[str], None] | None = None,
        on_activate: Callable[[Port], None] | None = None,
    ) -> None:
        self.facts = facts
        self.port = port
        self.on_change = on_change
        self.on_activate = on_activate
        version = facts.versions.next()
        self._versions = dict.fromkeys(self.kinds, version)

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.facts.is_sender:
            return ("node", "device", "source", "flow", "sender")
        return ("node", "device", "receiver")

    @property
    def port_kind(self) -> str:
        return "sender" if self.facts.is_sender else "receiver"

    def resource(self, kind: str) -> JSON:
        version = self._versions[kind]
        facts = self.facts
        if kind == "sender":
            return model.sender(
                facts,
                version,
                receiver_id=self.port.active["receiver_id"],
                active=self.port.active["master_enable"],
            )
        if kind == "receiver":
            return model.receiver(
                facts,
                version,
                sender_id=self.port.active["sender_id"],
                active=self.port.active["master_enable"],
            )
        build: Callable[[NodeFacts, str], JSON] = getattr(model, kind)
        return build(facts, version)

    def resources(self, kind: str) -> list[JSON]:
        """The Node API's list of `kind` (empty for a kind this Node has none of)."""
        return [self.resource(kind)] if kind in self._versions else []

    def find(self, kind: str, resource_id: str) -> JSON | None:
        found = self.resources(kind)
        return found[0] if found and found[0]["id"] == resource_id else None

    def _bump(self, kind: str) -> None:
        self._versions[kind] = self.facts.versions.next()
        if self.on_change is not None:
            self.on_change(kind)

    def set_devices(self, devices: Sequence[UsbDevice] | None) -> bool:
        """A new device list for the Source; True if it changed. The ids stay."""
        new = None if devices is None else tuple(sorted(devices, key=lambda d: d.busid))
        if new == self.facts.devices:
            return False
        old_classes = (
            None if self.facts.devices is None else model.offered_classes(self.facts.devices)
        )
        self.facts.devices = new
        self._bump("source")
        if self.facts.is_sender and old_classes != (
            None if new is None else model.offered_classes(new)
        ):
            self._bump("sender")
        return True

    def patch(self, body: Any, now: tuple[int, int]) -> Answer:
        answer = self.port.patch(body, now)
        if answer.activated:
            self._activated()
        return answer

    def activate_due(self, now: tuple[int, int]) -> bool:
        """Run the scheduled activation if it is due; True if it ran."""
        due = self.port.pending
        if due is None or due > now:
            return False
        self.port.activate(now)
        self._activated()
        return True

    def _activated(self) -> None:
        self._bump(self.port_kind)
        if self.on_activate is not None:
            self.on_activate(self.port)
