"""IS-05 staged and active parameters of one Sender or Receiver, and their activation.

Pure: a PATCH body and the time in, the answer and what is now due out; the caller runs
scheduled activations when they fall due (`Port.due`) and applies an activation to the
gateway. Transport parameters follow TR-10-14: a Sender has `source_ip` and `source_port`
(where its TCP server listens) per leg; a Receiver `source_ip` and `source_port` (the
Sender's) and `interface_ip` (its own) per leg.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .model import JSON, tai_text
from .sdp import Leg, SdpError, parse_sdp

IMMEDIATE = "activate_immediate"
RELATIVE = "activate_scheduled_relative"
ABSOLUTE = "activate_scheduled_absolute"
MODES = (IMMEDIATE, RELATIVE, ABSOLUTE)
SDP_TYPE = "application/sdp"
_TAI = re.compile(r"^[0-9]+:[0-9]+$")
AUTO = "auto"


class PatchError(Exception):
    """A PATCH refused: the HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 200 done (or staged), 202 scheduled
    body: JSON
    due: tuple[int, int] | None = None  # a scheduled activation's TAI time
    activated: bool = False  # an immediate activation took place


def _tai(text: Any) -> tuple[int, int]:
    if not isinstance(text, str) or not _TAI.match(text):
        raise PatchError(400, f"requested_time {text!r} is not a TAI time <seconds>:<nanoseconds>")
    seconds, nanos = (int(p) for p in text.split(":"))
    if nanos >= 1_000_000_000:
        raise PatchError(400, f"requested_time {text!r}: nanoseconds out of range")
    return seconds, nanos


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    seconds, nanos = divmod(a[1] + b[1], 1_000_000_000)
    return a[0] + b[0] + seconds, nanos


def _no_activation() -> JSON:
    return {"mode": None, "requested_time": None, "activation_time": None}


def _ip(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise PatchError(400, f"{name} must be an IP address, not {value!r}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise PatchError(400, f"{name} {value!r} is not an IP address") from None


def _port(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PatchError(400, f"{name} must be a port 1..65535, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Param:
    """One transport parameter: how a value is checked, its constraint and what "auto"
    (if allowed) becomes on /active."""

    name: str
    check: Callable[[Any, str], Any]
    constraint: JSON
    nullable: bool = True
    auto: Any = None  # the value "auto" resolves to; None: "auto" is refused

    def read(self, value: Any) -> Any:
        if value is None:
            if not self.nullable:
                raise PatchError(400, f"{self.name} may not be null")
            return None
        if value == AUTO:
            if self.auto is None:
                raise PatchError(400, f"{self.name} does not take 'auto'")
            return AUTO
        checked = self.check(value, self.name)
        allowed = self.constraint.get("enum")
        if allowed is not None and checked not in allowed:
            raise PatchError(400, f"{self.name} {value!r} is not one of {allowed}")
        return checked


def sender_params(leg: Leg) -> list[Param]:
    return [
        Param("source_ip", _ip, {"enum": [leg.host]}, auto=leg.host),
        Param("source_port", _port, {"enum": [leg.port]}, auto=leg.port),
    ]


def receiver_params(interface_ips: Sequence[str], default_port: int) -> list[Param]:
    return [
        Param("source_ip", _ip, {}),
        Param("source_port", _port, {"minimum": 1, "maximum": 65535}, auto=default_port),
        Param(
            "interface_ip",
            _ip,
            {"enum": list(interface_ips)},
            nullable=False,
            auto=interface_ips[0],
        ),
    ]


class Port:
    """One Sender's or Receiver's /staged, /active and /constraints."""

    def __init__(self, kind: str, legs: Sequence[Sequence[Param]], initial: Sequence[JSON]) -> None:
        self.kind = kind  # "sender" or "receiver"
        self.legs = [list(leg) for leg in legs]
        self.peer_key = "receiver_id" if kind == "sender" else "sender_id"
        self.staged: JSON = {
            self.peer_key: None,
            "master_enable": kind == "sender",
            "activation": _no_activation(),
            "transport_params": [dict(p) for p in initial],
        }
        if kind == "receiver":
            self.staged["transport_file"] = {"data": None, "type": None}
        self.active: JSON = self._resolved(self.staged, _no_activation())
        self.pending: tuple[int, int] | None = None

    # -- reading

    def constraints(self) -> list[JSON]:
        return [{p.name: dict(p.constraint) for p in leg} for leg in self.legs]

    def leg_params(self, active: bool = True) -> list[JSON]:
        """The (active) transport parameters, "auto" resolved."""
        return copy.deepcopy((self.active if active else self.staged)["transport_params"])

    # -- PATCH

    def patch(self, body: Any, now: tuple[int, int]) -> Answer:
        """Stage `body`; activate it now or schedule it. The state is unchanged on error."""
        if not isinstance(body, dict):
            raise PatchError(400, "the body must be a JSON object")
        allowed = set(self.staged)
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise PatchError(400, f"unknown parameter(s): {', '.join(unknown)}")
        activation = body.get("activation")
        if self.pending is not None and not (
            isinstance(activation, dict) and activation.get("mode", AUTO) is None
        ):
            raise PatchError(423, "a scheduled activation is pending; cancel it first")
        staged = copy.deepcopy(self.staged)
        if self.peer_key in body:
            staged[self.peer_key] = self._peer(body[self.peer_key])
        if "master_enable" in body:
            if not isinstance(body["master_enable"], bool):
                raise PatchError(400, "master_enable must be true or false")
            staged["master_enable"] = body["master_enable"]
        if "transport_file" in body:
            staged["transport_file"] = self._transport_file(body["transport_file"], staged)
        if "transport_params" in body:
            staged["transport_params"] = self._params(
                body["transport_params"], staged["transport_params"]
            )
        due, answer_status = None, 200
        if activation is not None:
            due, answer_status = self._activation(activation, staged, now)
        self.staged = staged
        if staged["activation"]["mode"] == IMMEDIATE:
            self.activate(now)
            shown = copy.deepcopy(self.staged)
            shown["activation"] = dict(self.active["activation"])
            return Answer(200, shown, activated=True)
        self.pending = due
        return Answer(answer_status, copy.deepcopy(self.staged), due)

    def _peer(self, value: Any) -> str | None:
        if value is None:
            return None
        try:
            uuid.UUID(str(value))
        except ValueError:
            raise PatchError(400, f"{self.peer_key} {value!r} is not a UUID") from None
        return str(value)

    def _transport_file(self, value: Any, staged: JSON) -> JSON:
        if self.kind != "receiver":
            raise PatchError(400, "a Sender has no transport_file")
        if not isinstance(value, dict) or set(value) - {"data", "type"}:
            raise PatchError(400, "transport_file must be {data, type}")
        data, kind = value.get("data"), value.get("type")
        if data is None:
            return {"data": None, "type": None}
        if not isinstance(data, str) or kind != SDP_TYPE:
            raise PatchError(400, f"transport_file must be SDP text of type {SDP_TYPE}")
        try:
            legs = parse_sdp(data)
        except SdpError as exc:
            raise PatchError(400, f"transport file refused: {exc}") from None
        # One leg of the file per leg of the Receiver; a second leg unused if only one.
        for index, params in enumerate(staged["transport_params"]):
            if index < len(legs):
                params["source_ip"] = legs[index].host
                params["source_port"] = legs[index].port
        return {"data": data, "type": SDP_TYPE}

    def _params(self, value: Any, current: list[JSON]) -> list[JSON]:
        if not isinstance(value, list) or len(value) != len(self.legs):
            raise PatchError(400, f"transport_params must be a list of {len(self.legs)} leg(s)")
        result = copy.deepcopy(current)
        for params, leg, changes in zip(self.legs, result, value, strict=True):
            if not isinstance(changes, dict):
                raise PatchError(400, "each leg of transport_params must be an object")
            known = {p.name: p for p in params}
            for name, new in changes.items():
                if name not in known:
                    raise PatchError(400, f"unknown transport parameter {name!r}")
                leg[name] = known[name].read(new)
        return result

    def _activation(
        self, value: Any, staged: JSON, now: tuple[int, int]
    ) -> tuple[tuple[int, int] | None, int]:
        if not isinstance(value, dict) or set(value) - {"mode", "requested_time"}:
            raise PatchError(400, "activation must be {mode, requested_time}")
        mode, requested = value.get("mode"), value.get("requested_time")
        if mode is None:  # cancels a scheduled activation
            staged["activation"] = _no_activation()
            return None, 200
        if mode not in MODES:
            raise PatchError(400, f"activation mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == IMMEDIATE:
            if requested is not None:
                raise PatchError(400, "an immediate activation has no requested_time")
            staged["activation"] = {"mode": mode, "requested_time": None, "activation_time": None}
            return None, 200
        when = _tai(requested)
        due = _add(now, when) if mode == RELATIVE else when
        staged["activation"] = {
            "mode": mode,
            "requested_time": requested,
            "activation_time": tai_text(due),
        }
        return due, 202

    # -- activation

    def activate(self, now: tuple[int, int]) -> None:
        """Staged becomes active (at `now`); staged's activation is cleared."""
        activation = dict(self.staged["activation"])
        activation["activation_time"] = tai_text(now)
        self.active = self._resolved(self.staged, activation)
        self.staged["activation"] = _no_activation()
        self.pending = None

    def _resolved(self, staged: JSON, activation: JSON) -> JSON:
        active = copy.deepcopy(staged)
        active["activation"] = activation
        for params, leg in zip(self.legs, active["transport_params"], strict=True):
            for p in params:
                if leg.get(p.name) == AUTO:
                    leg[p.name] = p.auto
        return active
