"""Zero-touch use on the client: attach the server's devices without a hand.

The agent runs beside the client gateway. While the link is up it lists the server's
devices through the gateway (mutual TLS, the same path `usbip list` takes) every
`interval`, and runs the real `usbip --tcp-port PORT attach -r 127.0.0.1 -b BUSID`
against the gateway's own loopback listener for each listed device the selection
allows (rules in the policy language; `allow` attaches). usbipd leaves devices in use
out of its list, so a device listed while vhci-hcd still has a port for it means the
port is stale (the link was cut and the server freed the device first): the port is
detached and the device attached again. Ports the kernel drops (device unplugged on
the server, link lost) are noticed in vhci's sysfs status. While the server cannot be
reached the agent retries with exponential backoff up to `backoff_max`.

What is attached comes from `/sys/devices/platform/vhci_hcd.*/status*` (port, status)
and `/var/run/vhci_hcd/portN` (`HOST PORT BUSID`, written by `usbip attach`), as
`usbip port` reads them; both roots are configurable for tests.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.companions.exporter import Runner, run_command
from gateway.config import Address, AgentSettings
from gateway.policy import ClientFacts, DeviceFacts, Policy
from gateway.protocol import ExportedDevice, ProtocolError
from gateway.transport.compression import compress_if_negotiated
from gateway.transport.tls import HandshakeFailed
from gateway.usbip.importer import list_devices

if TYPE_CHECKING:
    from gateway.edges.client_gateway import ClientGateway
    from gateway.edges.server_gateway import ServerGateway

log = logging.getLogger("gateway.companions.agent")

VDEV_ST_USED = 6  # vhci port status: attached and in use
LIST_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class VhciPort:
    port: int
    host: str
    tcp_port: int
    busid: str  # the bus id on the server


def read_vhci(vhci: Path, state_dir: Path) -> list[VhciPort]:
    """Ports in use, with what `usbip attach` recorded for them (ports without a record
    were attached by something else and are not listed)."""
    used: list[int] = []
    for status in sorted(vhci.glob("vhci_hcd.*/status*")):
        try:
            lines = status.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) >= 3
                and fields[1].isdigit()
                and fields[2].isdigit()
                and int(fields[2]) == VDEV_ST_USED
            ):
                used.append(int(fields[1]))
    ports: list[VhciPort] = []
    for port in used:
        try:
            record = (state_dir / f"port{port}").read_text().split()
        except OSError:
            continue
        if len(record) == 3 and record[1].isdigit():
            ports.append(VhciPort(port, record[0], int(record[1]), record[2]))
    return ports


def select_policy(settings: AgentSettings) -> Policy:
    return Policy.parse("".join(f"{line}\n" for line in settings.select), "agent.select")


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        gateway: ClientGateway,
        attach_to: Address,
        *,
        runner: Runner = run_command,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        reverse_server: str | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        # Reverse mode: a server gateway that dials in, listed through its own local port
        # (the path `usbip list` takes), not through a connection the gateway dials.
        self.reverse_server = reverse_server
        self.server = reverse_server or str(gateway.config.server)
        self.attach_to = attach_to  # the client gateway's own loopback listener
        self.select = select_policy(settings)
        self.runner = runner
        self.clock = clock
        self.jitter = jitter  # uniform in [0, 1): spreads the retries of many clients
        self.vhci_missing = False  # vhci-hcd not loaded at the last look (said once)
        self.link = "starting"  # "up", "down"
        self.last_error = ""
        self.failures = 0  # consecutive failed lists
        self.retry_in = 0.0
        self.listed: list[str] = []  # listed and selected at the last look
        self.attached: dict[str, int] = {}  # server bus id -> vhci port
        self.attach_failures: dict[str, tuple[int, float]] = {}  # busid -> (count, not before)
        self.attaches = 0
        self.reattaches = 0
        self.detaches = 0
        self.events: list[dict[str, Any]] = []  # the last few changes, for /status
        self.rounds = 0
        self._round = trio.Event()

    # -- the loop

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        log.info(
            "agent: attaching from %s through %s (%s)",
            self.server,
            self.attach_to,
            self.select.summary(),
        )
        self.vhci_loaded()  # said at start, not at the first device
        task_status.started()
        while True:
            wait = await self.round()
            await trio.sleep(wait)

    async def wait_round(self) -> int:
        await self._round.wait()
        return self.rounds

    async def round(self) -> float:
        """One look at the server; how long to wait before the next."""
        try:
            devices = await self.list()
        except (
            OSError,
            HandshakeFailed,
            trio.TooSlowError,
            trio.BrokenResourceError,  # the link broke after the handshake, mid-list
            ConnectionError,
            ProtocolError,
        ) as exc:
            why = str(exc) or type(exc).__name__
            self.failures += 1
            self.retry_in = self._backoff(self.failures - 1)
            if self.link != "down" or why != self.last_error:
                log.warning(
                    "agent: server gateway %s unreachable: %s; retrying in %gs",
                    self.server,
                    why,
                    self.retry_in,
                )
            self.link, self.last_error = "down", why
            self._forget_lost()
            self._finish_round()
            return self.retry_in
        if self.link != "up":
            log.info("agent: link to %s up", self.gateway.config.server)
            self._event("link up")
        self.link, self.last_error, self.failures, self.retry_in = "up", "", 0, 0.0
        await self.reconcile(devices)
        self._finish_round()
        return self.settings.interval

    def _backoff(self, failures: int) -> float:
        """Exponential up to `backoff_max`, then between half and all of it at random
        ("equal jitter"): clients that lost the server together do not retry together."""
        ceiling = min(self.settings.interval * 2.0**failures, self.settings.backoff_max)
        return ceiling / 2 + ceiling / 2 * self.jitter()

    def vhci_loaded(self) -> bool:
        """Whether vhci-hcd is loaded (its platform devices exist): without it every
        `usbip attach` fails. Said once when it goes missing and once when it is back."""
        loaded = any(self.settings.vhci.glob("vhci_hcd.*"))
        if not loaded and not self.vhci_missing:
            log.error(
                "agent: vhci-hcd is not loaded (no %s/vhci_hcd.*): nothing is attached "
                "until it is; run `modprobe vhci-hcd` (or list it in /etc/modules-load.d)",
                self.settings.vhci,
            )
        elif loaded and self.vhci_missing:
            log.info("agent: vhci-hcd loaded")
        self.vhci_missing = not loaded
        return loaded

    def _finish_round(self) -> None:
        self.rounds += 1
        self._round.set()
        self._round = trio.Event()

    async def list(self) -> tuple[ExportedDevice, ...]:
        with trio.fail_after(LIST_TIMEOUT):
            if self.reverse_server is not None:
                plain = await trio.open_tcp_stream(self.attach_to.host, self.attach_to.port)
                return await list_devices(plain, self.gateway.config.limits)
            stream = await self.gateway.connect()
            link = compress_if_negotiated(
                stream,
                level=self.gateway.config.compression.level,
                on_bytes=self.gateway.metrics.compressed,
            )
            return await list_devices(link, self.gateway.config.limits)

    def ours(self) -> dict[str, int]:
        """Server bus id -> vhci port, for ports attached through our listener."""
        return {
            p.busid: p.port
            for p in read_vhci(self.settings.vhci, self.settings.state_dir)
            if p.tcp_port == self.attach_to.port and p.host in (self.attach_to.host, "localhost")
        }

    def _forget_lost(self) -> None:
        now = self.ours()
        for busid in sorted(set(self.attached) - set(now)):
            log.info("agent: %s detached (port %d gone)", busid, self.attached[busid])
            self._event("detached", busid)
        self.attached = now

    async def reconcile(self, devices: tuple[ExportedDevice, ...]) -> None:
        self._forget_lost()
        wanted: list[str] = []
        for device in devices:
            facts = DeviceFacts.from_record(device.info, device.interfaces)
            if self.select.decide(ClientFacts(), facts).allowed:
                wanted.append(facts.busid)
        self.listed = wanted
        if wanted and not self.vhci_loaded():
            return
        for busid in wanted:
            stale = self.attached.get(busid)
            if stale is not None:
                # usbipd lists only free devices: the server has let go of this one.
                log.warning(
                    "agent: %s is free on the server but port %d still holds it: "
                    "detaching the stale port",
                    busid,
                    stale,
                )
                await self.detach(stale)
                self.reattaches += 1
            await self.attach(busid)
        self.attached = self.ours()

    async def attach(self, busid: str) -> bool:
        count, not_before = self.attach_failures.get(busid, (0, 0.0))
        if trio.current_time() < not_before:
            return False
        argv = [
            *self.settings.usbip,
            "--tcp-port",
            str(self.attach_to.port),
            "attach",
            "-r",
            self.attach_to.host,
            "-b",
            busid,
        ]
        started = trio.current_time()
        status, output = await self.runner(argv)
        if status != 0:
            delay = self._backoff(count)
            self.attach_failures[busid] = (count + 1, trio.current_time() + delay)
            log.error(
                "agent: attach %s failed (exit status %d: %s); next try in %gs",
                busid,
                status,
                output,
                delay,
            )
            self._event("attach failed", busid, output)
            return False
        self.attach_failures.pop(busid, None)
        self.attaches += 1
        took = trio.current_time() - started
        log.info("agent: attached %s in %.2fs", busid, took)
        self._event("attached", busid)
        return True

    async def detach(self, port: int) -> None:
        status, output = await self.runner([*self.settings.usbip, "detach", "-p", str(port)])
        self.detaches += 1
        if status != 0:
            log.warning(
                "agent: detach of port %d failed (exit status %d: %s)", port, status, output
            )

    def _event(self, what: str, busid: str = "", detail: str = "") -> None:
        self.events.append({"time": self.clock(), "event": what, "busid": busid, "detail": detail})
        del self.events[:-20]

    def status(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "dialer": "client" if self.reverse_server is None else "server",
            "link": self.link,
            "last_error": self.last_error,
            "failures": self.failures,
            "retry_in_seconds": self.retry_in,
            "vhci_loaded": not self.vhci_missing,
            "selected": list(self.listed),
            "attached": [{"busid": b, "port": p} for b, p in sorted(self.attached.items())],
            "attaches": self.attaches,
            "reattaches": self.reattaches,
            "detaches": self.detaches,
            "events": list(self.events),
        }


# ------------------------------------------------------------------ beside a gateway


async def run_companions(
    gateway: ServerGateway | ClientGateway,
    listeners: list[Any],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """What runs beside a gateway when configured: the exporter and the mDNS announcer
    (server), the agent (client). Ends only when cancelled."""
    from gateway.config import ServerConfig  # noqa: PLC0415

    async with trio.open_nursery() as nursery:
        config = gateway.config
        if isinstance(config, ServerConfig):
            if config.exporter.enabled:
                from gateway.companions.exporter import Exporter  # noqa: PLC0415

                exporter = Exporter(config.exporter)
                gateway.metrics.status_sections["exporter"] = exporter.status
                await nursery.start(exporter.run)
            if config.discovery.announce:
                from gateway.companions.discovery import Announcer, announced_addresses  # noqa: PLC0415

                port = _bound_port(listeners, config.listen[0].port)
                addresses = announced_addresses(config.discovery, config.listen)
                nursery.start_soon(Announcer(config.discovery, port, addresses).run)
        elif config.agent.enabled:
            if config.listen:
                port = _bound_port(listeners, config.listen[0].port)
                host = config.listen[0].host
                host = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
                agent = Agent(config.agent, gateway, Address(host, port))  # type: ignore[arg-type]
                gateway.metrics.status_sections["agent"] = agent.status
                await nursery.start(agent.run)
            # Each server gateway that dials in: its own agent, on its own local port.
            for name, local in getattr(gateway, "reverse_addresses", {}).items():
                host = "127.0.0.1" if local.host in ("0.0.0.0", "", "localhost") else local.host
                agent = Agent(
                    config.agent,
                    gateway,  # type: ignore[arg-type]
                    Address(host, local.port),
                    reverse_server=name,
                )
                gateway.metrics.status_sections[f"agent {name}"] = agent.status
                await nursery.start(agent.run)
        task_status.started()


def _bound_port(listeners: list[Any], configured: int) -> int:
    for listener in listeners:
        sock = getattr(listener, "socket", None)
        if sock is not None:
            port: int = sock.getsockname()[1]
            return port
    return configured
