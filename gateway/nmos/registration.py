"""Registration (IS-04): register the Node's resources with a Registration API, keep them
there with heartbeats, send each change, and re-register when the registry has lost
them (a restart answers a heartbeat with 404). A registry that fails (no answer, a 5xx)
is left for the next one by priority; with none at all the Node advertises itself for
peer-to-peer use, and withdraws that once a registry is found again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from gateway.config import NmosSettings

from .client import HttpFailed, http_request
from .dnssd import DnsSd, Registry
from .metrics import NmosMetrics
from .model import NODE_API_VERSION
from .state import NodeState

log = logging.getLogger("gateway.nmos.registration")

REQUEST_TIMEOUT = 2.0  # one request to a registry; a silent one is left after this
FIRST_BROWSE = 3.0  # how long DNS-SD is given before the Node goes peer-to-peer
RETRY = 1.0  # between looks for a registry while there is none


class RegistryFailed(Exception):
    """This registry cannot be used now: try the next."""


class Registration:
    def __init__(
        self,
        state: NodeState,
        settings: NmosSettings,
        *,
        dnssd: DnsSd | None = None,
        advertise: Callable[[], Awaitable[None]] | None = None,
        metrics: NmosMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.state = state
        self.settings = settings
        self.dnssd = dnssd
        self.advertise = advertise  # peer-to-peer advertisement, while no registry
        self.base = f"/x-nmos/registration/{NODE_API_VERSION}"
        self.registry: Registry | None = None  # the one in use
        self.registered = trio.Event()  # set while registered (for tests and /status)
        self._dirty: set[str] = set()
        self.ever_registered = False
        self._wake = trio.Event()

    def changed(self, kind: str) -> None:
        """A resource changed: send it at once."""
        self._dirty.add(kind)
        self._wake.set()

    async def candidates(self) -> list[Registry]:
        if self.settings.registry is not None:
            address = self.settings.registry
            return [Registry(0, address.host, address.port, "configured")]
        if self.dnssd is None:
            return []
        return await self.dnssd.registries()

    async def run(self) -> None:
        if self.dnssd is not None and self.settings.registry is None:
            await trio.sleep(FIRST_BROWSE)
        failed: set[Registry] = set()  # left for the next by priority, until all failed
        while True:
            found = await self.candidates()
            untried = [r for r in found if r not in failed]
            if not untried:
                failed.clear()
                if not found and self.advertise is not None:
                    try:
                        await self.advertise()
                    except Exception as exc:  # zeroconf refused it: try again later
                        log.warning("NMOS: cannot advertise the Node: %s", exc)
                await trio.sleep(RETRY)
                continue
            registry = untried[0]
            try:
                await self._use(registry)
            except RegistryFailed as exc:
                log.warning("NMOS: registry %s:%d: %s", registry.host, registry.port, exc)
                failed.add(registry)
                if self.metrics is not None:
                    self.metrics.registry_failures.inc()
            finally:
                self.registry = None
                self.registered = trio.Event()
                if self.metrics is not None:
                    self.metrics.registered.set(0)

    async def _use(self, registry: Registry) -> None:
        """Register with `registry` and keep at it until it fails."""
        self.registry = registry
        if self.dnssd is not None:
            await self.dnssd.withdraw()
        node_id = self.state.facts.id("node")
        if self.ever_registered:
            # Another registry of the same system may hold the Node already: a heartbeat
            # says (404: it does not), and registering is only done when needed.
            status, _ = await self._request(registry, "POST", f"/health/nodes/{node_id}")
            if status != 200:
                await self._register_all(registry)
        else:
            await self._register_all(registry)
            self.ever_registered = True
        log.info("NMOS: registered with %s:%d", registry.host, registry.port)
        self.registered.set()
        if self.metrics is not None:
            self.metrics.registered.set(1)
        beat = True  # the first heartbeat at once: the registry knows it is in use
        while True:
            if not beat:
                with trio.move_on_after(self.settings.heartbeat_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
            beat = False
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                for kind in self.state.kinds:
                    if kind in dirty:
                        await self._post(registry, kind)
                continue
            status, _ = await self._request(registry, "POST", f"/health/nodes/{node_id}")
            if status == 404:
                log.warning(
                    "NMOS: registry %s:%d lost the Node: registering again",
                    registry.host,
                    registry.port,
                )
                await self._register_all(registry)
            elif status != 200:
                raise RegistryFailed(f"heartbeat answered {status}")

    async def _register_all(self, registry: Registry) -> None:
        self._dirty.clear()
        status = await self._post(registry, "node")
        if status == 200:
            # Already there: what it holds may be stale, so start afresh (IS-04).
            await self._request(
                registry, "DELETE", f"/resource/nodes/{self.state.facts.id('node')}"
            )
            await self._post(registry, "node")
        for kind in self.state.kinds[1:]:
            await self._post(registry, kind)

    async def _post(self, registry: Registry, kind: str) -> int:
        body = {"type": kind, "data": self.state.resource(kind)}
        status, answer = await self._request(registry, "POST", "/resource", body)
        if status not in (200, 201):
            raise RegistryFailed(f"registering the {kind} answered {status}: {answer[:200]!r}")
        return status

    async def _request(
        self, registry: Registry, method: str, path: str, body: object = None
    ) -> tuple[int, bytes]:
        try:
            status, answer = await http_request(
                registry.host,
                registry.port,
                method,
                self.base + path,
                body,
                timeout=REQUEST_TIMEOUT,
            )
        except HttpFailed as exc:
            raise RegistryFailed(str(exc)) from None
        if status >= 500:
            raise RegistryFailed(f"{method} {path} answered {status}")
        return status, answer


def node_txt(counters: dict[str, int]) -> dict[str, str]:
    """The peer-to-peer TXT records: the API and a counter per resource kind."""
    txt = {"api_proto": "http", "api_ver": NODE_API_VERSION, "api_auth": "false"}
    short = {"node": "slf", "source": "src", "flow": "flw", "device": "dvc", "sender": "snd"}
    short["receiver"] = "rcv"
    for kind, name in short.items():
        txt[f"ver_{name}"] = str(counters.get(kind, 0) % 256)
    return txt
