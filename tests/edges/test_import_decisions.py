"""IMPORT decisions on the device as it is at import time, through the real server
gateway in front of a usbipd that records every byte it is sent: a rejected device and an
absent one are the same from outside, in the bytes and in what reaches usbipd; a device
replaced since a listing is judged afresh; an IMPORT reply for another device than the
one listed is refused."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from gateway.config import Address, AuditSettings, PolicySettings, TLSSettings
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import ExportedDevice, InterfaceInfo
from gateway.sim.catalog import make_devices
from gateway.transport.names import local_address

from ..pkitools import PKI, server_config
from .recording_usbipd import RecordingUsbipd
from .tls_client import OP_REQ_DEVLIST, exchange, op_req_import

# Keyboards and mice are invisible to everyone; the Gadget Zeros (0525:a4a0) are allowed.
POLICY = """\
reject with-interface one-of { 03:*:* }
allow id 0525:a4a0
default reject
"""
OP_REP_IMPORT_NODEV = b"\x01\x11\x00\x03\x00\x00\x00\x04"
OP_REP_IMPORT_OK = b"\x01\x11\x00\x03\x00\x00\x00\x00"
RECORD_SIZE = 312
ANSWER_BOUND = 10  # seconds; a hang fails the test
HID = InterfaceInfo(3, 1, 1)


@dataclass
class Lab:
    usbipd: RecordingUsbipd
    server: ServerGateway
    address: Address
    tls: TLSSettings
    audit: Path

    async def ask(self, request: bytes) -> tuple[bytes, list[bytes]]:
        """The reply to `request`, and what usbipd was sent meanwhile. An IMPORT's reply
        ends at its device record: a relayed import stays open until the client closes."""
        self.usbipd.take()
        until = len(OP_REP_IMPORT_OK) + RECORD_SIZE if request[2:4] == b"\x80\x03" else None
        with trio.fail_after(ANSWER_BOUND):
            reply = await exchange(self.address, self.tls, request, until=until)
            await self.server.wait_idle()  # the client has closed: so has the session
        return reply, self.usbipd.take()

    def plug(self, *devices: ExportedDevice) -> None:
        self.usbipd.listing = devices
        self.usbipd.imports = {d.info.busid: d.info for d in devices}

    async def records(self) -> list[dict[str, object]]:
        self.server.audit.close()
        await self.server.audit.finished.wait()
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


CATALOG = {d.busid: d.exported() for d in make_devices()}  # 1-1, 1-2 Gadget Zero, 1-3 HID


@pytest.fixture
async def lab(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> Lab:
    usbipd = RecordingUsbipd()
    upstream = await nursery.start(usbipd.serve)
    policy, audit = tmp_path / "policy.rules", tmp_path / "audit.jsonl"
    policy.write_text(POLICY)
    config = replace(
        server_config(pki, upstream),
        policy=PolicySettings(file=policy, watch=False, sysfs=None),
        audit=AuditSettings(path=str(audit)),
    )
    server = ServerGateway(config)
    listeners = await nursery.start(server.serve)
    address = local_address(listeners[0])
    lab = Lab(usbipd, server, address, pki.client_tls(), audit)
    lab.plug(*CATALOG.values())
    return lab


async def test_a_rejected_device_and_an_absent_one_are_the_same_outside_and_upstream(
    lab: Lab,
) -> None:
    # The keyboard at 1-3 is plugged in and rejected. A client lists first, as `usbip
    # list` then `usbip attach` would (an earlier listing must not shortcut the import).
    listed_with, _ = await lab.ask(OP_REQ_DEVLIST)
    rejected = await lab.ask(op_req_import("1-3"))
    never_there = await lab.ask(op_req_import("7-7"))
    # Now it is unplugged.
    lab.plug(CATALOG["1-1"], CATALOG["1-2"])
    listed_without, _ = await lab.ask(OP_REQ_DEVLIST)
    unplugged = await lab.ask(op_req_import("1-3"))

    assert listed_with == listed_without  # DEVLIST: same bytes, whether hidden or absent
    assert listed_with[:12] == b"\x01\x11\x00\x05\x00\x00\x00\x00\x00\x00\x00\x02"
    assert rejected == never_there == unplugged  # the reply, and usbipd's traffic
    assert rejected == (OP_REP_IMPORT_NODEV, [OP_REQ_DEVLIST])  # a listing, never an IMPORT


async def test_a_device_replaced_since_a_listing_is_judged_afresh(lab: Lab) -> None:
    listed, _ = await lab.ask(OP_REQ_DEVLIST)
    assert b"1-1\0" in listed  # the Gadget Zero is there and allowed
    # Replugged: same bus id, same 0525:a4a0, but now a keyboard.
    zero = CATALOG["1-1"]
    keyboard = ExportedDevice(
        replace(zero.info, devnum=zero.info.devnum + 10, num_interfaces=1), (HID,)
    )
    lab.plug(keyboard, CATALOG["1-2"])
    assert await lab.ask(op_req_import("1-1")) == (OP_REP_IMPORT_NODEV, [OP_REQ_DEVLIST])
    decisions = [r for r in await lab.records() if r["event"] == "decision"]
    assert decisions[-1]["request"] == "import"
    assert decisions[-1]["decision"] == "reject"


async def test_an_import_reply_for_another_device_than_the_one_listed_is_refused(
    lab: Lab,
) -> None:
    # Listed as the Gadget Zero, replugged (re-enumerated, another configuration)
    # between the gateway's listing and the IMPORT: the reply's record is not the one
    # the decision was made on.
    zero = CATALOG["1-1"].info
    lab.usbipd.imports["1-1"] = replace(zero, devnum=zero.devnum + 10, num_interfaces=1)
    reply, upstream = await lab.ask(op_req_import("1-1"))
    with trio.fail_after(ANSWER_BOUND):
        await lab.usbipd.wait_handled(2)
    assert reply == OP_REP_IMPORT_NODEV  # as for a refused device: nothing relayed
    # usbipd got the listing request and the IMPORT, then its connection was closed
    # without a byte more (the device is free again).
    assert upstream == [OP_REQ_DEVLIST, op_req_import("1-1")]
    assert (
        lab.server.metrics.registry.get_sample_value(
            "usbip_gateway_policy_decisions_total",
            {"role": "server", "target": "import", "decision": "deny"},
        )
        == 1
    )
    assert (
        lab.server.metrics.registry.get_sample_value(
            "usbip_gateway_sessions_total", {"role": "server", "outcome": "denied"}
        )
        == 1
    )
    decision = [r for r in await lab.records() if r["event"] == "decision"][-1]
    assert decision["decision"] == "reject"
    assert "changed between the listing and the import" in str(decision["reason"])


async def test_the_listed_device_itself_is_imported(lab: Lab) -> None:
    # The control for the refusals above: same usbipd, the record as listed.
    reply, upstream = await lab.ask(op_req_import("1-1"))
    assert reply == OP_REP_IMPORT_OK + CATALOG["1-1"].info.encode()
    assert upstream == [OP_REQ_DEVLIST, op_req_import("1-1")]
