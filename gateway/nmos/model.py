"""The IS-04 resources of a gateway's Node, as the TR-10-14 USB model shapes them.

Pure: facts in (ids, addresses, devices), JSON-ready dicts out. The ids derive from a seed
(`[nmos] seed`), so a restart keeps them; versions are TAI timestamps that grow with each
change.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

NODE_API_VERSION = "v1.3"
CONNECTION_API_VERSION = "v1.1"
# Not TR-10-14's `urn:x-matrox:transport:usb`: the wire here is USB/IP over mutual TLS.
TRANSPORT = "urn:x-usbip-gateway:transport:usbip-tls"
FORMAT = "urn:x-nmos:format:data"
MEDIA_TYPE = "application/usb"
USB_DEVICES = "urn:x-matrox:usb_devices"
CAP_USB_CLASS = "urn:x-matrox:cap:transport:usb_class"
BUS_ID_LENGTH = 64  # TR-10-14's ipmx_bus_id: the bus id's UTF-8 bytes, zero padded
TAI_OFFSET = 37  # TAI - UTC, seconds, since 2017
_NAMESPACE = uuid.UUID("4d1d6bd0-3c3e-5f0a-9a52-7a1f0c7d9b21")

JSON = dict[str, Any]


def resource_id(seed: str, kind: str) -> str:
    """A stable UUID (version 5) for one resource of the Node `seed` names."""
    return str(uuid.uuid5(_NAMESPACE, f"{seed}/{kind}"))


def tai_now() -> tuple[int, int]:
    """Now as TAI seconds and nanoseconds."""
    ns = time.time_ns() + TAI_OFFSET * 1_000_000_000
    return divmod(ns, 1_000_000_000)


def tai_text(stamp: tuple[int, int]) -> str:
    return f"{stamp[0]}:{stamp[1]}"


class Versions:
    """Version stamps that only grow, even when two changes fall in one nanosecond."""

    def __init__(self) -> None:
        self._last = (0, 0)

    def next(self) -> str:
        now = tai_now()
        if now <= self._last:
            seconds, nanos = self._last
            now = (seconds + 1, 0) if nanos == 999_999_999 else (seconds, nanos + 1)
        self._last = now
        return tai_text(now)


@dataclass(frozen=True, slots=True)
class UsbDevice:
    """One exported device, as the Source's `urn:x-matrox:usb_devices` lists it."""

    busid: str
    device_class: int
    interface_classes: tuple[int, ...]
    vendor: int
    product: int
    serial: str | None

    @property
    def classes(self) -> tuple[int, ...]:
        """The device class, or its interfaces' when it defers to them (class 0)."""
        if self.device_class != 0:
            return (self.device_class,)
        return tuple(dict.fromkeys(self.interface_classes))

    def as_json(self) -> JSON:
        raw = self.busid.encode()[:BUS_ID_LENGTH]
        return {
            "ipmx_bus_id": list(raw.ljust(BUS_ID_LENGTH, b"\0")),
            "class": list(self.classes),
            "vendor": self.vendor,
            "product": self.product,
            "serial": self.serial or "",
        }


@dataclass(frozen=True, slots=True)
class Interface:
    """A network interface of the Node (IS-04 `interfaces`)."""

    name: str
    port_id: str  # MAC, as IS-04 writes it: aa-bb-cc-dd-ee-ff


@dataclass(slots=True)
class NodeFacts:
    """What the resources are made from; `role` is "server" (a Sender) or "client"."""

    seed: str
    role: str
    label: str
    hostname: str
    host: str  # where the APIs are reached, as the hrefs name it
    port: int
    interfaces: tuple[Interface, ...]
    binding: tuple[str, ...]  # interface names, one per leg
    devices: tuple[UsbDevice, ...] | None = None  # None: not published
    receiver_classes: tuple[int, ...] = ()  # empty: any
    versions: Versions = field(default_factory=Versions)

    def id(self, kind: str) -> str:
        return resource_id(self.seed, kind)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def is_sender(self) -> bool:
        return self.role == "server"


def _core(facts: NodeFacts, kind: str, version: str, label: str, description: str) -> JSON:
    return {
        "id": facts.id(kind),
        "version": version,
        "label": label,
        "description": description,
        "tags": {},
    }


def node(facts: NodeFacts, version: str) -> JSON:
    what = "USB/IP server gateway" if facts.is_sender else "USB/IP client gateway"
    return {
        **_core(facts, "node", version, facts.label, what),
        "href": facts.base + "/",
        "hostname": facts.hostname,
        "caps": {},
        "api": {
            "versions": [NODE_API_VERSION],
            "endpoints": [
                {
                    "host": facts.host,
                    "port": facts.port,
                    "protocol": "http",
                    "authorization": False,
                }
            ],
        },
        "services": [],
        "clocks": [],  # USB has no media clock
        "interfaces": [
            {"chassis_id": None, "port_id": i.port_id, "name": i.name} for i in facts.interfaces
        ],
    }


def device(facts: NodeFacts, version: str) -> JSON:
    control = f"{facts.base}/x-nmos/connection/{CONNECTION_API_VERSION}/"
    return {
        **_core(facts, "device", version, facts.label, "USB devices over USB/IP and mutual TLS"),
        "type": "urn:x-nmos:device:generic",
        "node_id": facts.id("node"),
        "senders": [facts.id("sender")] if facts.is_sender else [],
        "receivers": [] if facts.is_sender else [facts.id("receiver")],
        "controls": [
            {
                "href": control,
                "type": f"urn:x-nmos:control:sr-ctrl/{CONNECTION_API_VERSION}",
                "authorization": False,
            }
        ],
    }


def source(facts: NodeFacts, version: str) -> JSON:
    resource = {
        **_core(facts, "source", version, f"{facts.label} USB", "the exported USB devices"),
        "format": FORMAT,
        "caps": {},
        "device_id": facts.id("device"),
        "parents": [],
        "clock_name": None,
    }
    if facts.devices is not None:
        resource[USB_DEVICES] = [d.as_json() for d in facts.devices]
    return resource


def flow(facts: NodeFacts, version: str) -> JSON:
    return {
        **_core(facts, "flow", version, f"{facts.label} USB", "USB/IP traffic"),
        "format": FORMAT,
        "media_type": MEDIA_TYPE,
        "source_id": facts.id("source"),
        "device_id": facts.id("device"),
        "parents": [],
    }


def offered_classes(devices: tuple[UsbDevice, ...]) -> list[int]:
    return sorted({c for d in devices for c in d.classes})


def sender(facts: NodeFacts, version: str, *, receiver_id: str | None, active: bool) -> JSON:
    resource = {
        **_core(facts, "sender", version, f"{facts.label} USB", "USB/IP server (TCP, mutual TLS)"),
        "flow_id": facts.id("flow"),
        "transport": TRANSPORT,
        "device_id": facts.id("device"),
        "manifest_href": (
            f"{facts.base}/x-nmos/connection/{CONNECTION_API_VERSION}"
            f"/single/senders/{facts.id('sender')}/transportfile"
        ),
        "interface_bindings": list(facts.binding),
        "subscription": {"receiver_id": receiver_id, "active": active},
    }
    if facts.devices is not None:
        resource["caps"] = {
            "constraint_sets": [{CAP_USB_CLASS: {"enum": offered_classes(facts.devices)}}]
        }
    return resource


def receiver(facts: NodeFacts, version: str, *, sender_id: str | None, active: bool) -> JSON:
    caps: JSON = {"media_types": [MEDIA_TYPE]}
    if facts.receiver_classes:
        caps["constraint_sets"] = [
            {
                "urn:x-nmos:cap:meta:label": "USB classes",
                CAP_USB_CLASS: {"enum": list(facts.receiver_classes)},
            }
        ]
        caps["version"] = version
    return {
        **_core(
            facts, "receiver", version, f"{facts.label} USB", "USB/IP client (TCP, mutual TLS)"
        ),
        "format": FORMAT,
        "caps": caps,
        "transport": TRANSPORT,
        "device_id": facts.id("device"),
        "interface_bindings": list(facts.binding),
        "subscription": {"sender_id": sender_id, "active": active},
    }
