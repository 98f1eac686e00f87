"""Per-device policy enforced by the server gateway, seen by two client identities."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Address, AuditSettings, PolicySettings, TLSSettings
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import CmdSubmit, Direction, OpStatus
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.usbip.importer import ImportRefused, import_device, list_devices

from ..pkitools import PKI, client_config, issue_client, server_config

# Simulated devices: 1-1 source/sink and 1-2 loopback (both 0525:a4a0), 1-3 keyboard.
POLICY = """\
# alice (by SPIFFE ID) may use the source/sink; bob sees the Gadget Zeros but may not
# import them, and may use the keyboard. Nothing else exists for anyone.
allow id 0525:a4a0 busid "1-1" client-uri "spiffe://lab.test/alice"
block id 0525:a4a0 client-cn "bob"
allow with-interface 03:01:01 client-cn "bob"
default reject
"""
REVOKE_ALICE = POLICY.replace('allow id 0525:a4a0 busid "1-1"', 'block id 0525:a4a0 busid "1-1"')


@dataclass
class Lab:
    sim: SimServer
    server: ServerGateway
    server_listeners: list[Any]
    policy: Path
    audit: Path
    alice: Address
    bob: Address


async def _start_client(
    nursery: trio.Nursery, pki: PKI, tls: TLSSettings, server: Address
) -> Address:
    gateway = ClientGateway(replace(client_config(pki, server), tls=tls))
    listeners = await nursery.start(gateway.serve)
    return local_address(listeners[0])


@pytest.fixture
async def lab(pki: PKI, tmp_path: Path, nursery: trio.Nursery) -> Lab:
    policy = tmp_path / "policy.rules"
    policy.write_text(POLICY)
    audit = tmp_path / "audit.jsonl"
    sim: SimServer = await nursery.start(partial(serve_sim, host="127.0.0.1", port=0))
    config = replace(
        server_config(pki, Address(*sim.addresses[0])),
        policy=PolicySettings(file=policy, watch=False),
        audit=AuditSettings(path=str(audit)),
    )
    server = ServerGateway(config, strings=sim)
    listeners = await nursery.start(server.serve)
    server_address = local_address(listeners[0])
    alice = issue_client(pki, tmp_path, "alice", uris=("spiffe://lab.test/alice",))
    bob = issue_client(pki, tmp_path, "bob", dns=("bob.lab.test",))
    return Lab(
        sim,
        server,
        listeners,
        policy,
        audit,
        await _start_client(nursery, pki, alice, server_address),
        await _start_client(nursery, pki, bob, server_address),
    )


async def _connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def _busids(address: Address) -> list[str]:
    return [d.info.busid for d in await list_devices(await _connect(address))]


async def _import_status(address: Address, busid: str) -> int:
    try:
        device = await import_device(await _connect(address), busid)
    except ImportRefused as exc:
        return exc.status
    await device.aclose()
    return OpStatus.OK


async def test_each_client_lists_exactly_its_devices(lab: Lab) -> None:
    assert await _busids(lab.alice) == ["1-1"]
    assert await _busids(lab.bob) == ["1-1", "1-2", "1-3"]  # blocked ones are listed


async def test_imports_are_allowed_blocked_or_rejected(lab: Lab) -> None:
    assert await _import_status(lab.alice, "1-1") == OpStatus.OK
    assert await _import_status(lab.bob, "1-3") == OpStatus.OK
    assert await _import_status(lab.bob, "1-1") == OpStatus.NA  # block: "Request Failed"
    assert await _import_status(lab.alice, "1-3") == OpStatus.NODEV  # reject
    # Only the two allowed imports ever reached the simulated usbipd.
    assert lab.sim.imports == 2


async def test_a_rejected_device_is_indistinguishable_from_an_absent_one(lab: Lab) -> None:
    async def raw_reply(busid: str) -> bytes:
        stream = await _connect(lab.alice)
        await stream.send_all(b"\x01\x11\x80\x03\x00\x00\x00\x00" + busid.encode().ljust(32, b"\0"))
        reply = b""
        while chunk := await stream.receive_some(1024):
            reply += chunk
        await stream.aclose()
        return reply

    exists = await raw_reply("1-3")  # the keyboard: present, rejected for alice
    absent = await raw_reply("7-7")  # no such device
    assert exists == absent == b"\x01\x11\x00\x03\x00\x00\x00\x04"  # OP_REP_IMPORT, NODEV


async def test_allowed_import_carries_urbs(lab: Lab) -> None:
    device = await import_device(await _connect(lab.alice), "1-1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        done = await device.submit(1, Direction.IN, length=512)
        assert done.status == 0
        assert len(done.data) == 512
        await device.aclose()


async def test_reload_that_revokes_access_closes_the_live_session(lab: Lab) -> None:
    device = await import_device(await _connect(lab.alice), "1-1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        assert (await device.submit(1, Direction.IN, length=64)).status == 0
        lab.policy.write_text(REVOKE_ALICE)
        assert lab.server.reload_policy()
        with trio.fail_after(10):
            await device.closed.wait()
        await device.aclose()
    assert await _import_status(lab.alice, "1-1") == OpStatus.NA
    await lab.server.wait_idle()
    lab.server.audit.close()
    await lab.server.audit.finished.wait()
    ends = [r for r in _records(lab.audit) if r["event"] == "session_end"]
    assert any("access revoked by policy reload" in r["outcome"] for r in ends)


async def test_a_broken_policy_on_reload_keeps_the_old_one(lab: Lab) -> None:
    lab.policy.write_text("allow id nonsense\n")
    assert not lab.server.reload_policy()
    assert lab.server.access.policy.generation == 1
    assert await _busids(lab.alice) == ["1-1"]
    assert await _import_status(lab.alice, "1-1") == OpStatus.OK


async def test_every_decision_and_session_end_is_audited(lab: Lab) -> None:
    assert await _import_status(lab.bob, "1-1") == OpStatus.NA
    await _busids(lab.alice)
    await lab.server.wait_idle()
    lab.server.audit.close()
    await lab.server.audit.finished.wait()
    records = _records(lab.audit)
    blocked = next(r for r in records if r["event"] == "decision" and r["request"] == "import")
    assert blocked["client"]["common_name"] == "bob"
    assert blocked["decision"] == "block"
    assert blocked["rule"] == 'line 4: block id 0525:a4a0 client-cn "bob"'
    assert blocked["device"] == {
        "busid": "1-1",
        "id": "0525:a4a0",
        "serial": lab.sim.devices["1-1"].serial,
    }
    listed = [r for r in records if r["event"] == "decision" and r["request"] == "devlist"]
    assert sorted((r["device"]["busid"], r["decision"]) for r in listed) == [
        ("1-1", "allow"),
        ("1-2", "reject"),
        ("1-3", "reject"),
    ]
    ends = [r for r in records if r["event"] == "session_end"]
    assert len(ends) == 2
    assert all(
        {"duration_seconds", "bytes_from_client", "urbs", "address"} <= r.keys() for r in ends
    )


async def test_usbip_list_per_identity(lab: Lab) -> None:
    usbip = shutil.which("usbip", path="/usr/sbin:/usr/bin")
    if usbip is None:
        pytest.fail("Debian's usbip tool is missing: apt-get install usbip (.ci/run does)")
    outputs = {}
    for name, address in (("alice", lab.alice), ("bob", lab.bob)):
        result = await trio.run_process(
            [usbip, "--tcp-port", str(address.port), "list", "-r", "127.0.0.1"],
            capture_stdout=True,
        )
        outputs[name] = result.stdout.decode()
    assert "1-1:" in outputs["alice"]
    assert "1-2:" not in outputs["alice"]
    assert "1-3:" not in outputs["alice"]
    assert all(f"{b}:" in outputs["bob"] for b in ("1-1", "1-2", "1-3"))


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_client_no_rule_mentions_never_reaches_usbipd(
    lab: Lab, pki: PKI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    carol = issue_client(pki, tmp_path, "carol")
    server_address = local_address(lab.server_listeners[0])
    address = await _start_client(nursery, pki, carol, server_address)
    before = lab.sim.connections_accepted
    # Every rule names alice or bob, so the default decides from the certificate alone.
    assert await _import_status(address, "1-1") == OpStatus.NODEV
    assert lab.sim.connections_accepted == before


async def test_an_urb_for_another_device_closes_the_session(lab: Lab) -> None:
    stream = await _connect(lab.alice)
    device = await import_device(stream, "1-1")
    received = lab.sim.bytes_received
    foreign = CmdSubmit(
        seqnum=1, devid=device.device.devid + 1, direction=Direction.IN, ep=1,
        transfer_buffer_length=64,
    )  # fmt: skip
    await stream.send_all(foreign.encode())
    assert await stream.receive_some(100) == b""  # closed, nothing answered
    await stream.aclose()
    await lab.server.wait_idle()
    assert lab.sim.bytes_received == received  # not one byte of it reached usbipd


async def test_the_policy_file_is_watched(
    pki: PKI, tmp_path: Path, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "policy.rules"
    rules.write_text(POLICY)
    config = replace(
        server_config(pki, Address("127.0.0.1", 9)),
        policy=PolicySettings(file=rules, watch_interval=2.0),
    )
    server = ServerGateway(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.watch_policy)
        await trio.sleep(5)
        assert server.access.policy.generation == 1  # unchanged file: no reload
        rules.write_text(REVOKE_ALICE)
        await trio.sleep(5)
        assert server.access.policy.generation == 2
        with caplog.at_level(logging.ERROR, "gateway.edges.access"):
            rules.write_text("allow nonsense\n")
            await trio.sleep(10)
        assert server.access.policy.generation == 2  # broken: the old policy stays
        assert caplog.text.count("policy reload failed") == 1  # said once, not every poll
        nursery.cancel_scope.cancel()
