"""The Node's resources and APIs as a client sees them over HTTP: stable ids, the model's
attributes, JSON errors, CORS, and the endpoint's limits (a body over 64 KiB is 413)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio

from gateway.config import Address, NmosSettings
from gateway.demo import start_stack
from gateway.nmos import model
from gateway.nmos.model import UsbDevice
from gateway.nmos.node import NmosNode, run_nmos

from ..pkitools import PKI

WAIT = 20.0


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def tai(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(":"))


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def patch(path: str, body: bytes) -> bytes:
    head = f"PATCH {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _settings(**extra: Any) -> NmosSettings:
    return NmosSettings(enabled=True, listen=Address("127.0.0.1", 0), registration=False, **extra)


async def test_resources_follow_the_model_and_keep_their_ids(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery, pki.server_tls(), pki.client_tls(),
                server_nmos=_settings(publish_devices=True, seed="lab-1"),
                client_nmos=_settings(usb_classes=(3,)),
            )  # fmt: skip
            node: NmosNode = await nursery.start(
                partial(run_nmos, stack.server, [stack.server_address])
            )
            client: NmosNode = await nursery.start(
                partial(run_nmos, stack.client, [stack.client_address])
            )
            port = node.facts.port
            _, _, body = await raw(port, get("/x-nmos/node/v1.3/flows/"))
            (flow,) = json.loads(body)
            assert (flow["format"], flow["media_type"]) == (model.FORMAT, "application/usb")
            _, _, body = await raw(port, get("/x-nmos/node/v1.3/senders"))
            (sender,) = json.loads(body)
            assert sender["transport"] == "urn:x-usbip-gateway:transport:usbip-tls"
            assert sender["flow_id"] == flow["id"]
            (constraints,) = sender["caps"]["constraint_sets"]
            assert constraints[model.CAP_USB_CLASS]["enum"] == [3, 255]  # HID; vendor
            _, _, body = await raw(client.facts.port, get("/x-nmos/node/v1.3/receivers"))
            (receiver,) = json.loads(body)
            assert receiver["caps"]["media_types"] == ["application/usb"]
            assert receiver["caps"]["constraint_sets"][0][model.CAP_USB_CLASS] == {"enum": [3]}
            # The ids are a function of the seed alone: the same after a restart.
            assert sender["id"] == model.resource_id("lab-1", "sender")
            assert flow["id"] == model.resource_id("lab-1", "flow")
            nursery.cancel_scope.cancel()


def test_a_device_change_keeps_ids_and_moves_versions_forward() -> None:
    from gateway.nmos.connection import Port, sender_params  # noqa: PLC0415
    from gateway.nmos.model import Interface, NodeFacts  # noqa: PLC0415
    from gateway.nmos.sdp import Leg  # noqa: PLC0415
    from gateway.nmos.state import NodeState  # noqa: PLC0415

    facts = NodeFacts(
        "s",
        "server",
        "lab",
        "lab",
        "127.0.0.1",
        1,
        (Interface("lo", "00-00-00-00-00-00"),),
        ("lo",),
        devices=(),
    )
    leg = Leg("127.0.0.1", 3240)
    changed: list[str] = []
    state = NodeState(facts, Port("sender", [sender_params(leg)], [{}]), on_change=changed.append)
    before = {k: state.resource(k) for k in state.kinds}
    keyboard = UsbDevice("1-3", 0, (3,), 0x1234, 0x5678, None)
    assert state.set_devices([keyboard])
    assert not state.set_devices([keyboard])  # the same list: nothing to send
    after = {k: state.resource(k) for k in state.kinds}
    assert {k: r["id"] for k, r in before.items()} == {k: r["id"] for k, r in after.items()}
    assert changed == ["source", "sender"]  # the classes offered changed too
    assert tai(after["source"]["version"]) > tai(before["source"]["version"])
    assert after["flow"]["version"] == before["flow"]["version"]
    (listed,) = after["source"][model.USB_DEVICES]
    assert listed["ipmx_bus_id"] == list(b"1-3") + [0] * 61
    assert listed["class"] == [3]
    assert listed["serial"] == ""


async def test_errors_cors_and_limits_over_http(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery, pki.server_tls(), pki.client_tls(), client_nmos=_settings()
            )
            node: NmosNode = await nursery.start(
                partial(run_nmos, stack.client, [stack.client_address])
            )
            port, rid = node.facts.port, node.facts.id("receiver")
            staged = f"/x-nmos/connection/v1.1/single/receivers/{rid}/staged"

            status, headers, body = await raw(port, get("/x-nmos/node/v1.3/nothing"))
            assert status == 404
            assert json.loads(body)["code"] == 404
            assert headers["access-control-allow-origin"] == "*"
            status, headers, _ = await raw(port, get("/x-nmos/node/v1.3/self", "OPTIONS"))
            assert status == 200
            assert "PATCH" in headers["access-control-allow-methods"]
            status, headers, _ = await raw(port, get("/x-nmos/node/v1.3/self", "DELETE"))
            assert (status, headers["allow"]) == (405, "GET, HEAD, OPTIONS")
            status, _, body = await raw(port, get("/x-nmos/node/v1.3/self", "HEAD"))
            assert (status, body) == (200, b"")
            status, _, body = await raw(port, patch(staged, b"{not json"))
            assert (status, json.loads(body)["error"]) == (400, "the body is not JSON")
            status, _, body = await raw(port, patch(staged, b'{"bad": "data"}'))
            assert status == 400
            assert "unknown parameter" in json.loads(body)["error"]
            status, _, _ = await raw(port, patch(staged, b" " * (65 * 1024)))
            assert status == 413
            # Still serving, and nothing was changed by the refused requests.
            status, _, body = await raw(port, get(staged))
            assert status == 200
            assert json.loads(body)["master_enable"] is True
            # Each refusal counted by status (the 413 is the HTTP layer's: bad_request).
            text = stack.client.metrics.exposition().decode()
            refused = 'usbip_gateway_nmos_requests_refused_total{role="client",status="%s"}'
            assert f"{refused % 400} 2.0" in text
            assert f"{refused % 404} 1.0" in text
            assert f"{refused % 405} 1.0" in text
            nursery.cancel_scope.cancel()


async def test_unplugging_a_device_updates_the_source_not_the_ids(pki: PKI) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery,
                pki.server_tls(),
                pki.client_tls(),
                server_nmos=_settings(publish_devices=True),
            )
            node: NmosNode = await nursery.start(
                partial(run_nmos, stack.server, [stack.server_address])
            )
            path = "/x-nmos/node/v1.3/sources"
            (before,) = json.loads((await raw(node.facts.port, get(path)))[2])
            assert len(before[model.USB_DEVICES]) == 3
            del stack.sim.devices["1-3"]  # the keyboard unplugged
            await node.refresh_devices()  # what the two-second poll does
            (after,) = json.loads((await raw(node.facts.port, get(path)))[2])
            assert len(after[model.USB_DEVICES]) == 2
            assert after["id"] == before["id"]
            assert tai(after["version"]) > tai(before["version"])
            nursery.cancel_scope.cancel()


async def test_a_fault_is_a_500_not_a_crash(caplog: Any) -> None:
    from gateway.nmos.api import NmosApi  # noqa: PLC0415
    from gateway.observability.http import Request  # noqa: PLC0415

    from .controller import sender_state  # noqa: PLC0415

    state = sender_state()
    refused: list[int] = []

    def boom(body: Any, now: Any) -> Any:
        raise RuntimeError("a bug")

    state.patch = boom  # type: ignore[method-assign]
    api = NmosApi(state, on_refused=refused.append)
    path = f"/x-nmos/connection/v1.1/single/senders/{state.facts.id('sender')}/staged"
    answer = await api(Request("PATCH", path, {}, b"{}"))
    assert answer.status == 500
    assert json.loads(answer.body)["error"] == "internal error (logged)"
    assert refused == [500]
    assert "internal error" in caplog.text
    assert (await api(Request("GET", path, {}, b""))).status == 200
