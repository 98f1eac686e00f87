"""A controller routes a USB device with NMOS alone: it reads the Sender from the server
gateway's Node API, gives its transport file to the client gateway's Receiver through
IS-05, activates, and a device streams byte-exact through the pair; deactivating ends
the session. The HTTP is a few lines of urllib, as any controller might do it."""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Any

import pytest
import trio

from gateway.config import Address
from gateway.demo import LOOPBACK_BUSID, Stack, start_stack
from gateway.nmos.node import NmosNode, run_nmos
from gateway.protocol import Direction
from gateway.usbip.importer import import_device, list_devices

from ..pkitools import PKI
from .controller import CONNECTION, NODE, http, nmos_settings

WAIT = 20.0


async def _nodes(nursery: trio.Nursery, pki: PKI) -> tuple[Stack, NmosNode, NmosNode]:
    stack = await start_stack(
        nursery,
        pki.server_tls(),
        pki.client_tls(),
        server_nmos=nmos_settings(publish_devices=True),
        client_nmos=nmos_settings(),
    )
    sender_node = await nursery.start(partial(run_nmos, stack.server, [stack.server_address]))
    receiver_node = await nursery.start(partial(run_nmos, stack.client, [stack.client_address]))
    return stack, sender_node, receiver_node


async def _connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def test_a_controller_connects_streams_and_disconnects_a_usb_device(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack, sender_node, receiver_node = await _nodes(nursery, pki)
            sender_api, receiver_api = sender_node.facts.base, receiver_node.facts.base
            (receiver,) = (await http("GET", f"{receiver_api}{NODE}/receivers"))[1]
            staged = f"{receiver_api}{CONNECTION}/single/receivers/{receiver['id']}/staged"

            # Switched off first: the client gateway then refuses to relay anything.
            off = {"master_enable": False, "activation": {"mode": "activate_immediate"}}
            assert (await http("PATCH", staged, off))[0] == 200
            with pytest.raises((ConnectionError, trio.BrokenResourceError, OSError)):
                await list_devices(await _connect(stack.client_address))

            # The controller: the Sender and its transport file, to the Receiver.
            status, senders = await http("GET", f"{sender_api}{NODE}/senders")
            assert status == 200
            (sender,) = senders
            status, sdp = await http("GET", sender["manifest_href"])
            assert status == 200
            assert f"m=application {stack.server_address.port} TCP usb" in sdp
            patch = {
                "sender_id": sender["id"],
                "master_enable": True,
                "transport_file": {"data": sdp, "type": "application/sdp"},
                "activation": {"mode": "activate_immediate"},
            }
            status, answer = await http("PATCH", staged, patch)
            assert status == 200, answer
            active = (await http("GET", staged.replace("/staged", "/active")))[1]
            assert active["sender_id"] == sender["id"]
            assert active["transport_params"][0]["source_ip"] == stack.server_address.host
            assert active["transport_params"][0]["source_port"] == stack.server_address.port
            (receiver,) = (await http("GET", f"{receiver_api}{NODE}/receivers"))[1]
            assert receiver["subscription"] == {"sender_id": sender["id"], "active": True}
            status_section = stack.client.metrics.status()["nmos"]
            assert status_section["receiver"]["peer"] == sender["id"]

            # A device through the pair, byte for byte.
            device = await import_device(await _connect(stack.client_address), LOOPBACK_BUSID)
            ended = trio.Event()

            async def serve() -> None:
                with contextlib.suppress(ConnectionError, trio.BrokenResourceError, OSError):
                    await device.serve()
                ended.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(serve)
                payload = os.urandom(64 * 1024)
                out = await device.submit(1, Direction.OUT, data=payload)
                back = await device.submit(1, Direction.IN, length=len(payload))
                assert out.status == 0
                assert back.data == payload
                assert len(stack.client.sessions) == 1

                # Deactivation: the attached session ends, its connection is closed.
                assert (await http("PATCH", staged, off))[0] == 200
                await ended.wait()
                await device.aclose()
                while stack.client.sessions or stack.server.attached:
                    await trio.sleep(0.01)
            (receiver,) = (await http("GET", f"{receiver_api}{NODE}/receivers"))[1]
            assert receiver["subscription"]["active"] is False
            text = stack.client.metrics.exposition().decode()
            assert 'usbip_gateway_nmos_activations_total{role="client"} 3.0' in text
            nursery.cancel_scope.cancel()


async def test_a_scheduled_activation_happens_when_due(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack, _, receiver_node = await _nodes(nursery, pki)
            base = receiver_node.facts.base
            rid = receiver_node.facts.id("receiver")
            staged = f"{base}{CONNECTION}/single/receivers/{rid}/staged"
            later = {
                "master_enable": False,
                "activation": {
                    "mode": "activate_scheduled_relative",
                    "requested_time": "0:200000000",
                },
            }
            status, answer = await http("PATCH", staged, later)
            assert status == 202, answer
            assert answer["activation"]["activation_time"]
            # Locked until then: another change is refused, the route still there.
            assert (await http("PATCH", staged, {"master_enable": True}))[0] == 423
            assert stack.client.route is not None
            while stack.client.route is not None:
                await trio.sleep(0.01)
            active = (await http("GET", staged.replace("/staged", "/active")))[1]
            assert active["master_enable"] is False
            assert active["activation"]["mode"] == "activate_scheduled_relative"
            nursery.cancel_scope.cancel()


async def test_the_source_lists_devices_only_for_its_audience(pki: PKI, tmp_path: Any) -> None:
    policy = tmp_path / "policy"
    policy.write_text('reject client-cn "nmos" busid 1-3\nallow\n')
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery,
                pki.server_tls(),
                pki.client_tls(),
                policy=policy,
                server_nmos=nmos_settings(publish_devices=True),
            )
            node = await nursery.start(partial(run_nmos, stack.server, [stack.server_address]))
            (source,) = (await http("GET", f"{node.facts.base}{NODE}/sources"))[1]
            listed = source["urn:x-matrox:usb_devices"]
            busids = {bytes(d["ipmx_bus_id"]).rstrip(b"\0").decode() for d in listed}
            assert busids == {"1-1", "1-2"}  # the keyboard (1-3) hidden from "nmos"
            assert all(len(d["ipmx_bus_id"]) == 64 for d in listed)
            # Other clients still see all three: the list is only the audience's.
            assert len(await list_devices(await _connect(stack.client_address))) == 3
            nursery.cancel_scope.cancel()


async def test_the_is04_target_connects_and_disconnects_too(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack, sender_node, receiver_node = await _nodes(nursery, pki)
            (sender,) = (await http("GET", f"{sender_node.facts.base}{NODE}/senders"))[1]
            rid = receiver_node.facts.id("receiver")
            target = f"{receiver_node.facts.base}{NODE}/receivers/{rid}/target"
            stack.client.reroute(None)
            status, answer = await http("PUT", target, sender)
            assert (status, answer["id"]) == (202, sender["id"])
            assert stack.client.route is not None
            assert stack.client.route.server == stack.server_address
            (receiver,) = (await http("GET", f"{receiver_node.facts.base}{NODE}/receivers"))[1]
            assert receiver["subscription"] == {"sender_id": sender["id"], "active": True}
            # A Sender whose transport file cannot be read is refused, nothing changed.
            broken = {**sender, "manifest_href": "http://127.0.0.1:1/nothing"}
            status, answer = await http("PUT", target, broken)
            assert status == 400
            assert "transport file" in answer["error"]
            assert stack.client.route is not None
            assert (await http("PUT", target, {}))[0] == 202
            assert stack.client.route is None
            nursery.cancel_scope.cancel()
