"""Registration with a registry that restarts, fails over to the next, and falls back to
peer-to-peer without one. The registries are small Apps on the project's HTTP endpoint."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio

from gateway.config import Address, NmosSettings
from gateway.nmos.dnssd import Registry
from gateway.nmos.model import UsbDevice
from gateway.nmos.registration import Registration
from gateway.observability.http import Answer, HttpLimits, Request, serve_http
from gateway.observability.metrics import GatewayMetrics

from ..pkitools import PKI
from .controller import sender_state

WAIT = 10.0
BASE = "/x-nmos/registration/v1.3"


class FakeRegistry:
    """Holds what was registered; `down` answers 503 to everything."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.posts: list[str] = []
        self.heartbeats = 0
        self.down = False

    async def __call__(self, request: Request) -> Answer:
        if self.down:
            return Answer(503, "application/json", b"{}")
        if request.method == "POST" and request.target == f"{BASE}/resource":
            body = json.loads(request.body)
            rid = body["data"]["id"]
            known = rid in self.resources
            self.resources[rid] = body
            self.posts.append(body["type"])
            return Answer(200 if known else 201, "application/json", b"{}")
        if request.method == "POST" and request.target.startswith(f"{BASE}/health/nodes/"):
            if request.target.rsplit("/", 1)[1] not in self.resources:
                return Answer(404, "application/json", b"{}")
            self.heartbeats += 1
            return Answer(200, "application/json", b"{}")
        if request.method == "DELETE":
            self.resources.clear()
            return Answer(204, "application/json", b"")
        return Answer(404, "application/json", b"{}")


class FakeBrowser:
    def __init__(self, registries: list[Registry]) -> None:
        self.found = registries
        self.withdrawn = 0

    async def registries(self) -> list[Registry]:
        return sorted(self.found)

    async def withdraw(self) -> None:
        self.withdrawn += 1


async def _serve(nursery: trio.Nursery, metrics: GatewayMetrics, app: FakeRegistry) -> int:
    listeners = await nursery.start(
        partial(
            serve_http,
            metrics,
            Address("127.0.0.1", 0),
            app=app,
            limits=HttpLimits(max_body=1 << 20),
        )
    )
    return int(listeners[0].socket.getsockname()[1])


async def _until(condition: Any) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_registers_beats_follows_changes_and_survives_a_registry_restart(pki: PKI) -> None:
    from gateway.config import ClientConfig  # noqa: PLC0415

    metrics = GatewayMetrics.for_client(
        ClientConfig(tls=pki.client_tls(), server=Address("127.0.0.1", 1), server_name="x")
    )
    registry = FakeRegistry()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, metrics, registry)
            state = sender_state()
            settings = NmosSettings(registry=Address("127.0.0.1", port), heartbeat_interval=0.05)
            registration = Registration(state, settings)
            state.on_change = registration.changed
            nursery.start_soon(registration.run)
            await _until(lambda: registry.heartbeats >= 2)
            assert registry.posts == ["node", "device", "source", "flow", "sender"]

            # A device plugged in: the Source again, with the same id.
            source_id = state.facts.id("source")
            state.set_devices([UsbDevice("1-1", 3, (), 0x046D, 0xC31C, "X")])
            await _until(lambda: registry.posts.count("source") == 2)
            devices = registry.resources[source_id]["data"]["urn:x-matrox:usb_devices"]
            assert [d["vendor"] for d in devices] == [0x046D]

            # The registry restarts empty: the next heartbeat's 404 registers all again.
            registry.resources.clear()
            posted = len(registry.posts)
            await _until(lambda: len(registry.resources) == 5)
            assert registry.posts[posted:] == ["node", "device", "source", "flow", "sender"]
            nursery.cancel_scope.cancel()


async def test_fails_over_by_priority_and_goes_peer_to_peer_without_registry(pki: PKI) -> None:
    from gateway.config import ClientConfig  # noqa: PLC0415

    metrics = GatewayMetrics.for_client(
        ClientConfig(tls=pki.client_tls(), server=Address("127.0.0.1", 1), server_name="x")
    )
    first, second = FakeRegistry(), FakeRegistry()
    advertised = []

    async def advertise() -> None:
        advertised.append(True)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            ports = [await _serve(nursery, metrics, r) for r in (first, second)]
            browser = FakeBrowser([])
            state = sender_state()
            registration = Registration(
                state,
                NmosSettings(heartbeat_interval=0.05),
                dnssd=browser,
                advertise=advertise,  # type: ignore[arg-type]
            )
            nursery.start_soon(registration.run)
            await _until(lambda: advertised)  # no registry: peer-to-peer
            browser.found = [
                Registry(20, "127.0.0.1", ports[1]),
                Registry(10, "127.0.0.1", ports[0]),
            ]
            await _until(lambda: first.heartbeats >= 1)
            assert second.posts == []  # the better priority first
            assert browser.withdrawn >= 1  # and the advertisement withdrawn
            first.down = True
            await _until(lambda: second.heartbeats >= 1)
            # A registry of the same system: a heartbeat found the Node missing there,
            # so it registered; the failed one was not asked again in between.
            assert second.posts[0] == "node"
            nursery.cancel_scope.cancel()
